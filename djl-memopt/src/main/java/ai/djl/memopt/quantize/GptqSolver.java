package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import com.google.common.base.Preconditions;

/**
 * GPTQ (Frantar et al. 2022) for one layer: quantizes the input columns of {@code W (out, in)} one at a time, and after
 * each column spreads its rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
 * layer's output error {@code H = 2 X^T X / n}, so that {@code |X W^T - X Q^T|} (not {@code |W - Q|}) is minimised.
 *
 * <p>Implementation notes: {@code H} is dampened by 1% of its mean diagonal (inputs that never fire get
 * {@code H_ii = 1} and a zero weight column), inverted once, and the inverse is downdated after each column
 * ({@code Hinv -= Hinv[:, i] Hinv[i, :] / Hinv[i, i]}, in FP64), which yields the same rows as the Cholesky form of the
 * paper (DJL has no Cholesky). int4 group scales and zero points are computed from the error-updated weights when the
 * first column of a group is reached (as GPTQ with {@code groupsize}); int8 scales from the original rows. Columns are
 * processed in natural order (no act-order). Cost: {@code O(in^3)} on the device plus a host read per column.
 */
final class GptqSolver {

    private GptqSolver() {}

    /**
     * @param weight (out, in)
     * @param xtx sum over calibration rows of {@code x^T x} (in, in)
     * @param rows number of calibration rows in {@code xtx}
     * @return the quantized tensor, attached to the weight's manager
     */
    static QuantizedTensor quantize(NDArray weight, NDArray xtx, long rows, QuantScheme scheme, int groupSize) {
        long out = weight.getShape().get(0);
        int in = Math.toIntExact(weight.getShape().get(1));
        Preconditions.checkArgument(rows > 0, "GPTQ needs at least one calibration row");
        boolean int4 = scheme == QuantScheme.INT4_WEIGHT_ONLY;
        int g = int4 ? groupSize : in;
        if (int4) {
            Int4WeightOnlyHandler.checkGroupSize(groupSize, in);
        }
        NDManager target = weight.getManager();
        try (NDManager tmp = target.newSubManager(weight.getDevice())) {
            NDArray w = Temps.copy(weight, tmp, DataType.FLOAT32); // (out, in)
            NDArray h = Temps.copy(xtx, tmp, DataType.FLOAT64).mul(2.0 / rows); // (in, in)
            NDArray diag = h.diagonal(); // (in)
            NDArray dead = diag.eq(0.0); // (in)
            NDArray eye = tmp.eye(in, in, 0, DataType.FLOAT64); // (in, in)
            h = h.add(eye.mul(dead.toType(DataType.FLOAT64, false))); // dead inputs: H_ii = 1
            w = w.mul(dead.logicalNot().toType(DataType.FLOAT32, false)); // and a zero weight column
            double damp = 0.01 * diag.mean().getDouble();
            if (damp <= 0) {
                damp = 0.01;
            }
            NDArray hinv = h.add(eye.mul(damp)).inverse(); // (in, in) FP64

            NDArray scale = null; // (out, 1)
            NDArray zero = null; // (out, 1), int4 only
            NDList scales = new NDList();
            NDList zeros = new NDList();
            NDList columns = new NDList();
            if (!int4) {
                scale = w.abs().max(new int[] {1}, true).div(127f).maximum(1e-12f); // (out, 1)
                scales.add(scale);
            }
            for (int i = 0; i < in; i++) {
                try (NDManager step = tmp.newSubManager()) {
                    if (int4 && i % g == 0) {
                        NDArray grp = w.get(new NDIndex(":, {}:{}", i, i + g)); // (out, g)
                        grp.attach(step);
                        NDArray min = grp.min(new int[] {1}, true).minimum(0f); // (out, 1)
                        NDArray max = grp.max(new int[] {1}, true).maximum(0f); // (out, 1)
                        scale = max.sub(min).div(15f).maximum(1e-12f); // (out, 1)
                        zero = min.neg().div(scale).round().clip(0, 15); // (out, 1)
                        scale.attach(tmp);
                        zero.attach(tmp);
                        scales.add(scale);
                        zeros.add(zero);
                    }
                    NDArray col = w.get(new NDIndex(":, {}:{}", i, i + 1)); // (out, 1)
                    col.attach(step);
                    NDArray q = int4
                            ? col.div(scale).round().add(zero).clip(0, 15).sub(zero).mul(scale)
                            : col.div(scale).round().clip(-127, 127).mul(scale); // (out, 1)
                    q.attach(tmp);
                    columns.add(q);
                    NDArray hrow = hinv.get(new NDIndex("{}:{}, :", i, i + 1)); // (1, in)
                    hrow.attach(step);
                    double d = hinv.getDouble(i, i);
                    NDArray err = col.sub(q).div((float) d); // (out, 1)
                    NDArray newW = w.sub(err.matMul(hrow.toType(DataType.FLOAT32, false))); // (out, in)
                    newW.attach(tmp);
                    w.close();
                    w = newW;
                    NDArray hcol = hinv.get(new NDIndex(":, {}:{}", i, i + 1)); // (in, 1)
                    hcol.attach(step);
                    NDArray newHinv = hinv.sub(hcol.matMul(hrow).div(d)); // (in, in)
                    newHinv.attach(tmp);
                    hinv.close();
                    hinv = newHinv;
                }
            }
            NDArray qw = NDArrays.concat(columns, 1); // (out, in) on the grid
            QuantizedTensor t;
            if (int4) {
                long groups = in / g;
                NDArray s = NDArrays.concat(scales, 1); // (out, G)
                NDArray z = NDArrays.concat(zeros, 1); // (out, G)
                NDArray codes = qw.reshape(out, groups, g).div(s.reshape(out, groups, 1)).round()
                        .add(z.reshape(out, groups, 1)).clip(0, 15).reshape(out, in); // (out, in)
                NDArray packed = Int4Packing.pack(codes); // (out, in/2)
                packed.attach(tmp);
                t = QuantizedTensor.of(scheme, g, weight.getShape(), packed, s,
                        z.toType(DataType.UINT8, false), null);
            } else {
                NDArray codes = qw.div(scale).round().clip(-127, 127).toType(DataType.INT8, false); // (out, in)
                t = QuantizedTensor.of(scheme, in, weight.getShape(), codes, scale, null, null);
            }
            t.attach(target);
            return t;
        }
    }
}
