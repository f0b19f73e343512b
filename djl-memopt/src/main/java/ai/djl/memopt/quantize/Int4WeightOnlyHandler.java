package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;

/**
 * Asymmetric uint4 per group of {@code g} consecutive input weights of a row: {@code s = (max - min) / 15},
 * {@code z = round(-min / s)}, {@code q = clip(round(w / s) + z, 0, 15)}, {@code w' = (q - z) s}, with
 * {@code min <= 0 <= max} forced so that {@code 0} is exactly representable (pruned zeros stay zero).
 *
 * <p>Asymmetric rather than symmetric: with only 16 levels, a symmetric grid wastes about half a level whenever a
 * group's values are skewed (common in small groups of 32-128), and the zero point costs only 8 bits per group here.
 * This is the GPTQ/AWQ/torchao int4 weight-only convention. Zero points are stored unpacked as UINT8 (one per
 * group; packing them would save 4 bits per group, under 0.1 bit per weight at g=32).
 */
final class Int4WeightOnlyHandler implements SchemeHandler {

    static final Int4WeightOnlyHandler INSTANCE = new Int4WeightOnlyHandler();

    private Int4WeightOnlyHandler() {}

    static void checkGroupSize(int groupSize, long in) {
        Preconditions.checkArgument(groupSize == 32 || groupSize == 64 || groupSize == 128,
                "int4 group size must be 32, 64 or 128, got %s", groupSize);
        Preconditions.checkArgument(in % groupSize == 0,
                "int4 group size %s must divide the input dimension %s", groupSize, in);
    }

    @Override
    public QuantizedTensor quantize(NDArray weight, int groupSize, NDArray inputScales) {
        Shape shape = weight.getShape();
        Preconditions.checkArgument(shape.dimension() == 2, "weight must be (out, in), got %s", shape);
        long out = shape.get(0);
        long in = shape.get(1);
        checkGroupSize(groupSize, in);
        NDManager target = weight.getManager();
        try (NDManager tmp = target.newSubManager(weight.getDevice())) {
            NDArray w = weight.toType(DataType.FLOAT32, true);
            w.attach(tmp);
            NDArray s = null;
            if (inputScales != null) {
                s = inputScales.toType(DataType.FLOAT32, true);
                s.attach(tmp);
                w = w.mul(s); // (out, in) * (in)
            }
            NDArray g = w.reshape(out, in / groupSize, groupSize); // (out, G, g)
            NDArray min = g.min(new int[] {2}, true).minimum(0f); // (out, G, 1)
            NDArray max = g.max(new int[] {2}, true).maximum(0f); // (out, G, 1)
            NDArray scale = max.sub(min).div(15f).maximum(1e-12f); // (out, G, 1)
            NDArray zero = min.neg().div(scale).round().clip(0, 15); // (out, G, 1)
            NDArray q = g.div(scale).round().add(zero).clip(0, 15).reshape(out, in); // (out, in)
            NDArray packed = Int4Packing.pack(q); // (out, in/2) UINT8
            packed.attach(tmp);
            NDArray scales = scale.reshape(out, in / groupSize); // (out, G)
            NDArray zeros = zero.reshape(out, in / groupSize).toType(DataType.UINT8, false); // (out, G)
            QuantizedTensor t = QuantizedTensor.of(QuantScheme.INT4_WEIGHT_ONLY, groupSize, shape, packed, scales,
                    zeros, s);
            t.attach(target);
            return t;
        }
    }

    @Override
    public NDArray fakeQuantize(NDArray w, int groupSize) {
        long out = w.getShape().get(0);
        long in = w.getShape().get(1);
        checkGroupSize(groupSize, in);
        NDArray g = w.reshape(out, in / groupSize, groupSize); // (out, G, g)
        NDArray min = g.min(new int[] {2}, true).minimum(0f); // (out, G, 1)
        NDArray max = g.max(new int[] {2}, true).maximum(0f); // (out, G, 1)
        NDArray scale = max.sub(min).div(15f).maximum(1e-12f); // (out, G, 1)
        NDArray zero = min.neg().div(scale).round().clip(0, 15); // (out, G, 1)
        return g.div(scale).round().add(zero).clip(0, 15).sub(zero).mul(scale).reshape(out, in); // (out, in)
    }

    @Override
    public NDArray dequantize(NDArray data, NDArray scales, NDArray zeros, int groupSize, NDManager manager) {
        NDArray q = Int4Packing.unpack(data); // (..., out, in) FP32 in 0..15
        q.attach(manager);
        Shape shape = q.getShape();
        Shape rows = shape.slice(0, shape.dimension() - 1); // (..., out)
        long groups = shape.get(shape.dimension() - 1) / groupSize;
        NDArray z = zeros.toType(DataType.FLOAT32, true);
        z.attach(manager);
        NDArray s = scales.reshape(rows.add(groups, 1)); // (..., out, G, 1); a new handle in the scales' manager
        s.attach(manager);
        return q.reshape(rows.add(groups, groupSize)) // (..., out, G, g)
                .sub(z.reshape(rows.add(groups, 1)))
                .mul(s)
                .reshape(shape); // (..., out, in)
    }
}
