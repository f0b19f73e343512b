package ai.djl.memopt.quantize;

import ai.djl.memopt.model.deepseek.TokenEmbedding;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Embedding;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;
import java.io.DataOutputStream;

/**
 * An embedding-table replacement holding a {@link QuantizedTensor} {@code (vocab, hidden)} instead of a float table:
 * int8 symmetric with one scale per row (per token), or int4 asymmetric in groups of {@code g} consecutive hidden
 * values of a row, packed as {@link Int4Packing} says (the same arrays and layout as a quantized {@code Linear}'s
 * {@code (out, in)} weight, with rows = tokens). A lookup gathers only the packed rows, scales and zero points of the
 * requested ids and dequantizes those rows, inside a sub-manager closed before returning: the float table never
 * exists.
 *
 * <p>Shapes: {@code ids (...)} of any integer type (values in {@code [0, vocab)}) -> {@code (..., hidden)} in the
 * original table's type (FP32 or FP16).
 *
 * <p>Replaces the DeepSeek {@code TokenEmbedding} (parameter {@code weight}) and DJL's {@link
 * ai.djl.nn.core.Embedding} when it is called with integer indices (parameter {@code embedding}); for the latter the
 * item-to-index methods ({@code embed}, {@code hasItem}) are gone: only the {@code forward} of indices remains. The
 * table is a plain array, not a {@link ai.djl.nn.Parameter}: it is frozen, gets no gradient, and training the other
 * parts of the model (QLoRA adapters) works as with a float embedding that is not trained.
 *
 * <pre>{@code
 * Quantizer.quantize(model, Int8WeightOnlyConfig.builder().optIncludeEmbeddings(true).build());
 * // or by hand:
 * BlockTrees.replace(model, "model.embed_tokens", e -> QuantizedEmbedding.of(
 *         QuantizedTensor.quantize(table, QuantScheme.INT8_WEIGHT_ONLY, hidden), DataType.FLOAT32, "weight"));
 * }</pre>
 *
 * <p>DJL's {@code saveParameters} cannot represent this block: save with {@code ai.djl.memopt.export.QuantizedArtifact}.
 */
public final class QuantizedEmbedding extends AbstractBlock {

    private static final byte VERSION = 1;

    private final QuantizedTensor table;
    private final DataType outputType;
    private final String parameterName;

    private QuantizedEmbedding(QuantizedTensor table, DataType outputType, String parameterName) {
        super(VERSION);
        this.table = table;
        this.outputType = outputType;
        this.parameterName = parameterName;
    }

    /**
     * Wraps a quantized table.
     *
     * @param table {@code (vocab, hidden)}, without AWQ input scales (a lookup has no input activations)
     * @param outputType FLOAT32 or FLOAT16: the original table's type, which lookups return
     * @param parameterName the name of the table parameter in the replaced block ({@code weight} for the DeepSeek
     *     {@code TokenEmbedding}, {@code embedding} for DJL's {@code Embedding}); artifacts record it
     */
    public static QuantizedEmbedding of(QuantizedTensor table, DataType outputType, String parameterName) {
        Preconditions.checkNotNull(table, "table");
        Preconditions.checkArgument(table.inputScales().isEmpty(),
                "a quantized embedding table has no AWQ input scales (a lookup has no input activations)");
        Preconditions.checkArgument(outputType == DataType.FLOAT32 || outputType == DataType.FLOAT16,
                "embedding output type must be FLOAT32 or FLOAT16, got %s", outputType);
        Preconditions.checkArgument(parameterName != null && !parameterName.isEmpty() && !parameterName.contains("."),
                "parameter name must be a non-empty name without dots, got '%s'", parameterName);
        // the table lives as long as its manager, even when created inside a caller's NDScope
        table.unregisterFromScopes();
        return new QuantizedEmbedding(table, outputType, parameterName);
    }

    /**
     * The table parameter {@code (vocab, hidden)} of an embedding block this class can replace: the DeepSeek {@code
     * TokenEmbedding}'s {@code weight} or DJL {@link ai.djl.nn.core.Embedding}'s {@code embedding}; null for any other
     * block.
     */
    public static Parameter tableParameter(Block block) {
        if (block instanceof TokenEmbedding) {
            return ((TokenEmbedding) block).weight();
        }
        if (block instanceof Embedding && block.getDirectParameters().contains("embedding")) {
            return block.getDirectParameters().get("embedding");
        }
        return null;
    }

    /** The quantized table {@code (vocab, hidden)}. */
    public QuantizedTensor quantizedTable() {
        return table;
    }

    /** The type lookups return (the original table's). */
    public DataType outputType() {
        return outputType;
    }

    /** The name of the replaced block's table parameter ({@code weight} or {@code embedding}). */
    public String parameterName() {
        return parameterName;
    }

    /** Rows (tokens). */
    public long vocabSize() {
        return table.shape().get(0);
    }

    /** Columns (hidden size). */
    public long embeddingSize() {
        return table.shape().get(1);
    }

    /**
     * The dequantized rows of {@code ids}, {@code (..., hidden)} in {@link #outputType()}, attached to
     * {@code ids}' manager.
     *
     * @throws IllegalArgumentException for a non-integer ids array, or (on the CPU, where it costs no device
     *     synchronisation) an id outside {@code [0, vocab)}
     */
    public NDArray lookup(NDArray ids) {
        DataType t = ids.getDataType();
        Preconditions.checkArgument(t.isInteger() || t == DataType.UINT8,
                "QuantizedEmbedding expects integer token ids, got %s", t);
        Shape idShape = ids.getShape();
        NDManager target = ids.getManager();
        if (idShape.size() == 0) {
            return target.create(idShape.add(embeddingSize()), outputType);
        }
        try (NDManager scope = target.newSubManager(table.data().getDevice())) {
            NDArray flat = ids.toDevice(table.data().getDevice(), true).toType(DataType.INT64, false); // (N)
            flat.attach(scope);
            flat = flat.reshape(-1);
            if (!flat.getDevice().isGpu()) {
                // On a GPU this check would be a device-to-host read per lookup, i.e. per decoding step, stalling the
                // queue; callers that take ids from users validate them on the host first (Generator does), as
                // torch.nn.Embedding on CUDA leaves it to a device-side assert.
                long min = flat.min().getLong();
                long max = flat.max().getLong();
                Preconditions.checkArgument(min >= 0 && max < vocabSize(),
                        "token ids must be in [0, %s), got values in [%s, %s]", vocabSize(), min, max);
            }
            NDIndex rows = new NDIndex("{}", flat);
            NDArray data = table.data().get(scope, rows); // (N, hidden) INT8 or (N, hidden/2) UINT8
            NDArray scales = table.scales().get(scope, rows); // (N, 1) or (N, G)
            NDArray zeros = table.zeros().isPresent() ? table.zeros().get().get(scope, rows) : null; // (N, G)
            QuantizedTensor picked = QuantizedTensor.of(table.scheme(), table.groupSize(),
                    new Shape(flat.getShape().get(0), embeddingSize()), data, scales, zeros, null);
            NDArray out = picked.dequantize(scope, outputType).reshape(idShape.add(embeddingSize())); // (..., hidden)
            out.attach(target);
            return out;
        }
    }

    /** The whole dequantized table {@code (vocab, hidden)} (for tests and merging), attached to {@code manager}. */
    public NDArray table(NDManager manager) {
        return table.dequantize(manager, outputType);
    }

    @Override
    protected NDList forwardInternal(ParameterStore parameterStore, NDList inputs, boolean training,
            PairList<String, Object> params) {
        return new NDList(lookup(inputs.head()));
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0].add(embeddingSize())};
    }

    @Override
    public void saveParameters(DataOutputStream os) {
        throw new UnsupportedOperationException("QuantizedEmbedding cannot be saved with DJL's saveParameters: use"
                + " ai.djl.memopt.export.QuantizedArtifact");
    }

    /** Frees the quantized table. */
    public void close() {
        table.close();
    }

    /** Bytes held by the quantized table. */
    public long nbytes() {
        return table.nbytes();
    }

    @Override
    public String toString() {
        return "QuantizedEmbedding(" + vocabSize() + " x " + embeddingSize() + ", " + table.scheme().id()
                + (table.scheme() == QuantScheme.INT4_WEIGHT_ONLY ? ", g" + table.groupSize() : "") + ")";
    }
}
