package ai.djl.memopt.quantize;

import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.memopt.nn.StackableProjection;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.core.Linear;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;
import java.io.DataOutputStream;
import java.util.ArrayList;
import java.util.List;
import java.util.Optional;

/**
 * A {@link Linear} replacement holding a {@link QuantizedTensor} instead of a float weight: {@code y = x W^T + b} with
 * {@code W} dequantized just in time at every forward, inside a sub-manager that is closed before returning, so only
 * one layer's dequantized weight exists at a time. The computation runs in the input's type (FP32 or FP16).
 *
 * <p>Under a gradient collector, autograd keeps each layer's dequantized weight until backward (it needs {@code W}
 * for {@code dL/dx}; DJL cannot register a custom backward that would re-dequantize), so the one-layer bound holds
 * for inference; in training, combine with activation checkpointing to bound it.
 *
 * <p>Shapes: input {@code (..., in)}, output {@code (..., out)}. The packed data, scales and bias are plain arrays,
 * not {@link ai.djl.nn.Parameter}s: they are never trained (adapters such as LoRA wrap this block instead) and a
 * gradient collector never sees them.
 *
 * <pre>{@code
 * Quantizer.quantize(model, Int4WeightOnlyConfig.builder().optGroupSize(128).build());
 * // or by hand:
 * Blocks.replace(model, "mlp.up_proj", l -> QuantizedLinear.of(QuantizedTensor.quantize(w, INT8_WEIGHT_ONLY, 0),
 *         null, DataType.FLOAT32));
 * }</pre>
 *
 * <p>DJL's {@code saveParameters} cannot represent this block: save quantized models with
 * {@code ai.djl.memopt.export.QuantizedArtifact}.
 */
public final class QuantizedLinear extends AbstractBlock implements LinearWeightSource, StackableProjection {

    private static final byte VERSION = 1;

    private final QuantizedTensor weight;
    private final NDArray bias;
    private final DataType weightType;
    private final QuantMethod method;

    private QuantizedLinear(QuantizedTensor weight, NDArray bias, DataType weightType, QuantMethod method) {
        super(VERSION);
        this.weight = weight;
        this.bias = bias;
        this.weightType = weightType;
        this.method = method;
    }

    /**
     * Wraps a quantized weight.
     *
     * @param bias {@code (out)} or null; kept in full precision
     * @param weightType the type of the original weight, which {@link #weight(NDManager)} returns
     */
    public static QuantizedLinear of(QuantizedTensor weight, NDArray bias, DataType weightType) {
        return of(weight, bias, weightType, weight.inputScales().isPresent() ? QuantMethod.AWQ : QuantMethod.RTN);
    }

    /**
     * Wraps a quantized weight, recording how its values were chosen (metadata for reports and artifacts).
     *
     * @param bias {@code (out)} or null; kept in full precision
     * @param weightType the type of the original weight, which {@link #weight(NDManager)} returns
     */
    public static QuantizedLinear of(QuantizedTensor weight, NDArray bias, DataType weightType, QuantMethod method) {
        Preconditions.checkNotNull(weight, "weight");
        Preconditions.checkNotNull(method, "method");
        if (bias != null) {
            Preconditions.checkArgument(bias.getShape().equals(new Shape(weight.shape().get(0))),
                    "bias must have shape (%s), got %s", weight.shape().get(0), bias.getShape());
        }
        Preconditions.checkArgument(weightType == DataType.FLOAT32 || weightType == DataType.FLOAT16,
                "weight type must be FLOAT32 or FLOAT16, got %s", weightType);
        // the layer's arrays live as long as their manager, even when created inside a caller's NDScope
        weight.unregisterFromScopes();
        if (bias != null) {
            NDScope.unregister(bias);
        }
        return new QuantizedLinear(weight, bias, weightType, method);
    }

    /** How the quantized values were chosen. */
    public QuantMethod method() {
        return method;
    }

    /** The quantized weight. */
    public QuantizedTensor quantizedWeight() {
        return weight;
    }

    /** The full-precision bias, if any. */
    public Optional<NDArray> bias() {
        return Optional.ofNullable(bias);
    }

    /** The original weight's type. */
    public DataType weightType() {
        return weightType;
    }

    /** Output features. */
    public long outFeatures() {
        return weight.shape().get(0);
    }

    /** Input features. */
    public long inFeatures() {
        return weight.shape().get(1);
    }

    /** {@code out x in}: the weights this layer holds packed, which are not DJL parameters. */
    @Override
    public long storedWeightCount() {
        return outFeatures() * inFeatures();
    }

    @Override
    public NDArray weight(NDManager manager) {
        return weight.dequantize(manager, weightType);
    }

    /** The quantized arrays, stackable over experts: data, scales, then the zero points and AWQ scales if present. */
    @Override
    public List<NDArray> weightArrays() {
        List<NDArray> arrays = new ArrayList<>(List.of(weight.data(), weight.scales()));
        weight.zeros().ifPresent(arrays::add);
        weight.inputScales().ifPresent(arrays::add);
        return arrays;
    }

    @Override
    public String stackMismatch(StackableProjection other) {
        QuantizedLinear q = (QuantizedLinear) other;
        QuantizedTensor t = q.quantizedWeight();
        if (q.bias().isPresent()) {
            return "a quantized projection with a bias";
        }
        if (t.scheme() != weight.scheme() || t.groupSize() != weight.groupSize() || !t.shape().equals(weight.shape())
                || t.inputScales().isPresent() != weight.inputScales().isPresent()
                || !t.data().getDevice().equals(weight.data().getDevice())) {
            return t + " differs from expert 0's " + weight;
        }
        if (t.scheme() != QuantScheme.INT8_WEIGHT_ONLY && t.scheme() != QuantScheme.INT4_WEIGHT_ONLY) {
            return "scheme " + t.scheme() + " is not supported";
        }
        return null;
    }

    /** Only the gathered rows are dequantized, with {@link QuantizedTensor}'s formula. */
    @Override
    public NDArray project(List<NDArray> rows, NDArray x, DataType type) {
        NDArray data = rows.get(0);
        NDArray zeros = weight.zeros().isPresent() ? rows.get(2) : null;
        NDArray inputScales = weight.inputScales().isPresent() ? rows.get(rows.size() - 1) : null;
        NDArray w = QuantizedTensor.dequantize(weight.scheme(), weight.groupSize(), data, rows.get(1), zeros,
                inputScales, data.getManager()); // (c, out, in) FP32
        return StackableProjection.times(w.toType(type, false), x);
    }

    @Override
    protected NDList forwardInternal(ParameterStore parameterStore, NDList inputs, boolean training,
            PairList<String, Object> params) {
        NDArray x = inputs.head(); // (..., in)
        Preconditions.checkArgument(x.getShape().get(x.getShape().dimension() - 1) == inFeatures(),
                "QuantizedLinear expects input (..., %s), got %s", inFeatures(), x.getShape());
        DataType type = x.getDataType();
        try (NDManager scope = x.getManager().newSubManager(x.getDevice())) {
            NDArray w = weight.dequantize(scope, type); // (out, in)
            NDArray b = null;
            if (bias != null) {
                b = bias.toType(type, true); // (out)
                b.attach(scope);
            }
            // the result belongs to x's manager, so it outlives the scope
            return Linear.linear(x, w, b); // (..., out)
        }
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        Shape in = inputShapes[0];
        return new Shape[] {in.slice(0, in.dimension() - 1).add(outFeatures())};
    }

    @Override
    public void saveParameters(DataOutputStream os) {
        throw new UnsupportedOperationException(
                "QuantizedLinear cannot be saved with DJL's saveParameters: use ai.djl.memopt.export.QuantizedArtifact");
    }

    /** Frees the quantized arrays and the bias. */
    public void close() {
        weight.close();
        if (bias != null) {
            bias.close();
        }
    }

    @Override
    public String toString() {
        return "QuantizedLinear(" + inFeatures() + " -> " + outFeatures() + ", " + weight.scheme().id()
                + (weight.scheme() == QuantScheme.INT4_WEIGHT_ONLY ? ", g" + weight.groupSize() : "")
                + ", " + method.id() + ")";
    }
}
