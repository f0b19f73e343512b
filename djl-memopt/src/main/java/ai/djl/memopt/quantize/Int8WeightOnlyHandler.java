package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;

/**
 * Symmetric int8 per output channel: {@code s = max|w_row| / 127}, {@code q = clip(round(w / s), -127, 127)}.
 * Symmetric because weight rows are close to zero-mean, so a zero point buys nothing at 8 bits and would cost a
 * subtraction per element at every forward; -128 is unused so the range is symmetric.
 */
final class Int8WeightOnlyHandler implements SchemeHandler {

    static final Int8WeightOnlyHandler INSTANCE = new Int8WeightOnlyHandler();

    private Int8WeightOnlyHandler() {}

    @Override
    public QuantizedTensor quantize(NDArray weight, int groupSize, NDArray inputScales) {
        Shape shape = weight.getShape();
        Preconditions.checkArgument(shape.dimension() == 2, "weight must be (out, in), got %s", shape);
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
            NDArray scale = w.abs().max(new int[] {1}, true).div(127f).maximum(1e-12f); // (out, 1)
            NDArray q = w.div(scale).round().clip(-127, 127).toType(DataType.INT8, false); // (out, in)
            QuantizedTensor t = QuantizedTensor.of(QuantScheme.INT8_WEIGHT_ONLY, (int) shape.get(1), shape, q, scale,
                    null, s);
            t.attach(target);
            return t;
        }
    }

    @Override
    public NDArray fakeQuantize(NDArray w, int groupSize) {
        NDArray scale = w.abs().max(new int[] {1}, true).div(127f).maximum(1e-12f); // (out, 1)
        return w.div(scale).round().clip(-127, 127).mul(scale); // (out, in)
    }

    @Override
    public NDArray dequantize(NDArray data, NDArray scales, NDArray zeros, int groupSize, NDManager manager) {
        NDArray q = data.toType(DataType.FLOAT32, true);
        q.attach(manager);
        long[] dims = data.getShape().getShape(); // (..., out, in)
        long in = dims[dims.length - 1];
        if (groupSize == in) {
            return q.mul(scales); // (..., out, in) * (..., out, 1)
        }
        long groups = in / groupSize;
        long[] grouped = java.util.Arrays.copyOf(dims, dims.length + 1);
        grouped[dims.length - 1] = groups;
        grouped[dims.length] = groupSize;
        long[] scaleDims = grouped.clone();
        scaleDims[dims.length] = 1;
        NDArray s = scales.reshape(new ai.djl.ndarray.types.Shape(scaleDims)); // a new handle in the scales' manager
        s.attach(manager);
        // (..., out, G, g) * (..., out, G, 1)
        return q.reshape(new ai.djl.ndarray.types.Shape(grouped)).mul(s).reshape(new ai.djl.ndarray.types.Shape(dims));
    }
}
