package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * The check {@link ParameterUpdate} makes before an update: whether the loss and the gradients of the trainable
 * parameters are finite, either parameter by parameter (naming the first bad one) or, in the GPU form, all at once
 * with one host read ({@link #lossAndGradientsFinite}).
 */
final class GradientCheck {

    private final Map<String, Parameter> parameters;

    GradientCheck(Map<String, Parameter> parameters) {
        this.parameters = parameters;
    }

    /** The name of the first trainable parameter whose gradient holds inf or NaN, or null if all are finite. */
    String firstNonFiniteGradient() {
        for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
            Parameter p = e.getValue();
            if (!p.requiresGradient() || !(p.getArray() instanceof PtNDArray)) {
                continue;
            }
            try (NDArray g = JniUtils.getGradient((PtNDArray) p.getArray())) {
                if (g != null && !allFinite(g)) {
                    return e.getKey();
                }
            }
        }
        return null;
    }

    /**
     * Whether {@code loss} and every trainable gradient are finite, with one host read: the maximum and minimum of an
     * array are finite exactly when all its elements are (an infinity is the maximum or the minimum, and a NaN
     * propagates through both), so the gradients, concatenated by type in groups of about 2^24 elements, are reduced
     * to two numbers each on the device and all of them tested at once.
     */
    boolean lossAndGradientsFinite(NDArray loss) {
        try (NDManager t = loss.getManager().newSubManager()) {
            NDList extremes = new NDList();
            NDArray wideLoss = loss.toType(DataType.FLOAT32, false).reshape(1);
            wideLoss.attach(t);
            extremes.add(wideLoss);
            Map<DataType, NDList> pending = new LinkedHashMap<>();
            Map<DataType, long[]> sizes = new LinkedHashMap<>();
            for (Parameter p : parameters.values()) {
                if (!p.requiresGradient() || !(p.getArray() instanceof PtNDArray)) {
                    continue;
                }
                NDArray g = JniUtils.getGradient((PtNDArray) p.getArray());
                if (g == null) {
                    continue;
                }
                g.attach(t);
                NDArray flat = g.reshape(-1);
                flat.attach(t);
                NDList group = pending.computeIfAbsent(g.getDataType(), k -> new NDList());
                group.add(flat);
                long[] size = sizes.computeIfAbsent(g.getDataType(), k -> new long[1]);
                size[0] += flat.size();
                if (size[0] >= 1L << 24) {
                    extremes.addAll(extremes(group, t));
                    group.clear();
                    size[0] = 0;
                }
            }
            for (NDList group : pending.values()) {
                if (!group.isEmpty()) {
                    extremes.addAll(extremes(group, t));
                }
            }
            return !anyNonFinite(extremes, t).getBoolean(); // (1 + 2 groups) values
        }
    }

    /** The maximum and minimum of the concatenated {@code arrays}, as FP32 arrays of shape (1) in {@code t}. */
    private static NDList extremes(NDList arrays, NDManager t) {
        NDArray all = arrays.size() == 1 ? arrays.get(0) : NDArrays.concat(arrays);
        all.attach(t);
        NDList out = extremes(all, t);
        if (all != arrays.get(0)) {
            all.close(); // the concatenated copy of this group's gradients
        }
        return out;
    }

    /**
     * The maximum and minimum of {@code a}, as FP32 arrays of shape (1) in {@code t}: both are finite exactly when
     * every element is (an infinity is the maximum or the minimum, and a NaN propagates through both).
     */
    static NDList extremes(NDArray a, NDManager t) {
        NDList out = new NDList(2);
        for (NDArray x : new NDArray[] {a.max(), a.min()}) { // 0-dimensional
            x.attach(t);
            NDArray x32 = x.toType(DataType.FLOAT32, false).reshape(1);
            x32.attach(t);
            out.add(x32);
        }
        return out;
    }

    /**
     * A 0-dimensional boolean on the device, in {@code t}: whether some of {@code values} (each of shape (1)) is not
     * finite.
     */
    static NDArray anyNonFinite(NDList values, NDManager t) {
        NDArray all = NDArrays.concat(values);
        all.attach(t);
        NDArray bad = all.isInfinite().logicalOr(all.isNaN()).any();
        bad.attach(t);
        return bad;
    }

    /**
     * Whether every element of {@code a} is finite: its maximum and minimum are (both reductions propagate NaN), two
     * read-only passes with scalar results and no temporaries.
     */
    static boolean allFinite(NDArray a) {
        if (a.isEmpty()) {
            return true;
        }
        try (NDArray max = a.max();
                NDArray min = a.min();
                NDArray wideMax = max.toType(DataType.FLOAT32, false);
                NDArray wideMin = min.toType(DataType.FLOAT32, false)) {
            return Float.isFinite(wideMax.getFloat()) && Float.isFinite(wideMin.getFloat());
        }
    }
}
