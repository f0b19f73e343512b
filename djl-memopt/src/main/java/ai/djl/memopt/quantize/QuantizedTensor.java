package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;
import java.util.Optional;

/**
 * A quantized weight matrix {@code (out, in)} (torchao's "tensor subclass" idea without the subclass): integer data,
 * scales, optional zero points, optional AWQ input-channel scales, group size, original shape and scheme. Built by the
 * factories {@link #quantize} (from a float weight) and {@link #of} (from stored arrays, validated).
 *
 * <table>
 *   <caption>Arrays by scheme</caption>
 *   <tr><th>scheme</th><th>data</th><th>scales</th><th>zeros</th></tr>
 *   <tr><td>int8</td><td>INT8 (out, in)</td><td>FP32 (out, 1), or (out, in/g) when grouped (GGUF Q8_0 loads
 *       as g = 32)</td><td>none (symmetric)</td></tr>
 *   <tr><td>int4</td><td>UINT8 (out, in/2), {@link Int4Packing}</td><td>FP32 (out, in/g)</td>
 *       <td>UINT8 (out, in/g), values 0..15</td></tr>
 * </table>
 *
 * <p>{@code inputScales} (FP32 {@code (in)}, AWQ only): the stored integers quantize {@code W diag(s)}; the effective
 * weight is {@code dequant(...) / s} per input column.
 *
 * <pre>{@code
 * QuantizedTensor q = QuantizedTensor.quantize(weight, QuantScheme.INT4_WEIGHT_ONLY, 128);
 * try (NDManager scope = manager.newSubManager()) {
 *     NDArray w = q.dequantize(scope, DataType.FLOAT32); // (out, in)
 * }
 * }</pre>
 *
 * <p>The arrays belong to the manager they were created or {@link #attach attached} to; {@link #close} frees them.
 */
public final class QuantizedTensor implements AutoCloseable {

    private final QuantScheme scheme;
    private final int groupSize;
    private final Shape shape;
    private final NDArray data;
    private final NDArray scales;
    private final NDArray zeros;
    private final NDArray inputScales;

    private QuantizedTensor(QuantScheme scheme, int groupSize, Shape shape, NDArray data, NDArray scales,
            NDArray zeros, NDArray inputScales) {
        this.scheme = scheme;
        this.groupSize = groupSize;
        this.shape = shape;
        this.data = data;
        this.scales = scales;
        this.zeros = zeros;
        this.inputScales = inputScales;
    }

    /**
     * Quantizes a float weight {@code (out, in)} by round to nearest; the result is attached to the weight's manager.
     *
     * @param groupSize input weights per scale for int4 (32, 64 or 128, dividing {@code in}); ignored for int8, which
     *     is per output channel
     */
    public static QuantizedTensor quantize(NDArray weight, QuantScheme scheme, int groupSize) {
        return SchemeHandler.of(scheme).quantize(weight, groupSize, null);
    }

    /**
     * Quantizes {@code W diag(inputScales)} and records {@code inputScales} (AWQ); attached to the weight's manager.
     */
    public static QuantizedTensor quantize(NDArray weight, QuantScheme scheme, int groupSize, NDArray inputScales) {
        return SchemeHandler.of(scheme).quantize(weight, groupSize, inputScales);
    }

    /**
     * Wraps stored arrays after checking types and shapes against the scheme (the artifact loader's entry point).
     *
     * @param zeros required for int4, must be null for int8
     * @param inputScales optional
     * @throws IllegalArgumentException naming the array whose type or shape is wrong and what was expected
     */
    public static QuantizedTensor of(QuantScheme scheme, int groupSize, Shape shape, NDArray data, NDArray scales,
            NDArray zeros, NDArray inputScales) {
        Preconditions.checkArgument(shape.dimension() == 2, "quantized weights are 2-D (out, in), got %s", shape);
        long out = shape.get(0);
        long in = shape.get(1);
        switch (scheme) {
            case INT8_WEIGHT_ONLY:
                // per output channel (group size = in), or per group of g inputs as ggml's Q8_0 blocks (g = 32)
                Preconditions.checkArgument(groupSize == in || (groupSize > 0 && in % groupSize == 0),
                        "int8 group size must equal in=%s or divide it, got %s", in, groupSize);
                check("qweight", data, DataType.INT8, new Shape(out, in));
                check("scales", scales, DataType.FLOAT32, new Shape(out, in / groupSize));
                Preconditions.checkArgument(zeros == null, "int8 is symmetric and has no zero points");
                break;
            case INT4_WEIGHT_ONLY:
                Int4WeightOnlyHandler.checkGroupSize(groupSize, in);
                check("qweight", data, DataType.UINT8, new Shape(out, in / 2));
                check("scales", scales, DataType.FLOAT32, new Shape(out, in / groupSize));
                Preconditions.checkArgument(zeros != null, "int4 needs zero points");
                check("zeros", zeros, DataType.UINT8, new Shape(out, in / groupSize));
                break;
            default:
                throw new IllegalArgumentException("unsupported scheme " + scheme);
        }
        if (inputScales != null) {
            check("input_scales", inputScales, DataType.FLOAT32, new Shape(in));
        }
        return new QuantizedTensor(scheme, groupSize, shape, data, scales, zeros, inputScales);
    }

    private static void check(String what, NDArray a, DataType type, Shape expected) {
        Preconditions.checkArgument(a != null, "%s is missing", what);
        Preconditions.checkArgument(a.getDataType() == type, "%s must be %s, got %s", what, type, a.getDataType());
        Preconditions.checkArgument(a.getShape().equals(expected), "%s must have shape %s, got %s", what, expected,
                a.getShape());
    }

    /**
     * The dequantized weight {@code (out, in)} of the given float type, computed on the data's device and attached
     * to {@code manager}; every temporary is freed before returning.
     */
    public NDArray dequantize(NDManager manager, DataType type) {
        Preconditions.checkArgument(type == DataType.FLOAT32 || type == DataType.FLOAT16 || type == DataType.FLOAT64,
                "can only dequantize to FLOAT32, FLOAT16 or FLOAT64, not %s", type);
        try (NDManager tmp = manager.newSubManager(data.getDevice())) {
            NDArray w = dequantize(scheme, groupSize, data, scales, zeros, inputScales, tmp); // (out, in) FP32
            NDArray out = w.toType(type, true);
            out.attach(manager);
            return out;
        }
    }

    /**
     * The effective FP32 weight {@code (..., out, in)} of quantized arrays with any leading dimensions: one weight's
     * (shapes as in the class table) or the rows of stacked experts' ({@code (c, out, in/2)}, {@code (c, out, in/g)},
     * AWQ {@code (c, in)}). The one dequantization formula of each scheme; temporaries and the result are attached to
     * {@code manager}.
     *
     * @param zeros int4 zero points, null for int8
     * @param inputScales AWQ input-channel scales {@code (..., in)}, or null
     */
    static NDArray dequantize(QuantScheme scheme, int groupSize, NDArray data, NDArray scales, NDArray zeros,
            NDArray inputScales, NDManager manager) {
        NDArray w = SchemeHandler.of(scheme).dequantize(data, scales, zeros, groupSize, manager); // (..., out, in)
        if (inputScales == null) {
            return w;
        }
        NDArray perColumn = inputScales.expandDims(-2); // (..., 1, in)
        perColumn.attach(manager);
        return w.div(perColumn);
    }

    /** The scheme. */
    public QuantScheme scheme() {
        return scheme;
    }

    /** Input weights per scale: the group size for int4, {@code in} for int8 (one scale per output row). */
    public int groupSize() {
        return groupSize;
    }

    /** The original weight shape {@code (out, in)}. */
    public Shape shape() {
        return shape;
    }

    /** Integer data: INT8 {@code (out, in)} or packed UINT8 {@code (out, in/2)}. */
    public NDArray data() {
        return data;
    }

    /** FP32 scales {@code (out, in/groupSize)}. */
    public NDArray scales() {
        return scales;
    }

    /** UINT8 zero points {@code (out, in/groupSize)} for int4. */
    public Optional<NDArray> zeros() {
        return Optional.ofNullable(zeros);
    }

    /** FP32 AWQ input-channel scales {@code (in)}, if the weight was quantized with AWQ. */
    public Optional<NDArray> inputScales() {
        return Optional.ofNullable(inputScales);
    }

    /** Bytes held by all arrays of this tensor. */
    public long nbytes() {
        long n = bytes(data) + bytes(scales);
        if (zeros != null) {
            n += bytes(zeros);
        }
        if (inputScales != null) {
            n += bytes(inputScales);
        }
        return n;
    }

    private static long bytes(NDArray a) {
        return a.size() * a.getDataType().getNumOfBytes();
    }

    /**
     * Takes every array out of the enclosing {@link NDScope}s, so that it lives as long as its manager
     * even when the tensor was made inside a caller's scope (a layer holding it outlives that scope).
     */
    public void unregisterFromScopes() {
        NDScope.unregister(data, scales);
        if (zeros != null) {
            NDScope.unregister(zeros);
        }
        if (inputScales != null) {
            NDScope.unregister(inputScales);
        }
    }

    /** Moves every array to {@code manager}. */
    public void attach(NDManager manager) {
        data.attach(manager);
        scales.attach(manager);
        if (zeros != null) {
            zeros.attach(manager);
        }
        if (inputScales != null) {
            inputScales.attach(manager);
        }
    }

    @Override
    public void close() {
        data.close();
        scales.close();
        if (zeros != null) {
            zeros.close();
        }
        if (inputScales != null) {
            inputScales.close();
        }
    }

    @Override
    public String toString() {
        return "QuantizedTensor{" + scheme.id() + ", group " + groupSize + ", shape " + shape
                + (inputScales != null ? ", awq" : "") + "}";
    }
}
