package ai.djl.memopt.quantize;

import ai.djl.memopt.nn.BlockSite;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import java.util.Locale;
import java.util.OptionalDouble;
import java.util.Set;

/**
 * {@link Quantizer}'s handling of an embedding table: round to nearest, a chunk of rows at a time, into a
 * {@link QuantizedEmbedding} (a lookup has no input activations for AWQ or GPTQ to weigh).
 */
final class EmbeddingQuantizer {

    /** Rows quantized at once: bounds the float temporaries of a large table (129k x 7168 for DeepSeek-V3). */
    private static final long CHUNK_ELEMENTS = 1L << 22;

    private EmbeddingQuantizer() {}

    /**
     * Replaces the embedding block at {@code path} by a {@link QuantizedEmbedding} (RTN, chunks of rows) and frees its
     * float table unless another block keeps it.
     */
    static QuantizationReport.Layer quantize(Block root, String path, Block block, Quantizer.Target target,
            Set<Parameter> kept) {
        QuantizationConfig config = target.config;
        Parameter param = QuantizedEmbedding.tableParameter(block);
        String paramName = param.getName(); // "weight" (TokenEmbedding) or "embedding" (DJL Embedding)
        BlockSite site = BlockTrees.site(root, path);
        NDArray table = site.value(param); // (vocab, hidden), the master copy under mixed precision
        long vocab = table.getShape().get(0);
        long hidden = table.getShape().get(1);
        int groupSize = config.scheme() == QuantScheme.INT8_WEIGHT_ONLY ? (int) hidden : target.groupSize;
        String note = target.note;
        if (config.method() != QuantMethod.RTN) {
            String rtn = "embedding: a lookup has no input activations for " + config.method().id().toUpperCase(
                    Locale.ROOT) + ", quantized with RTN";
            note = note == null ? rtn : note + "; " + rtn;
        }
        long rowsPerChunk = Math.max(1, CHUNK_ELEMENTS / hidden);
        NDManager owner = table.getManager();
        QuantizedTensor q;
        double signal = 0;
        double noise = 0;
        try (NDManager tmp = owner.newSubManager(table.getDevice())) {
            NDList data = new NDList();
            NDList scales = new NDList();
            NDList zeros = new NDList();
            for (long start = 0; start < vocab; start += rowsPerChunk) {
                long end = Math.min(vocab, start + rowsPerChunk);
                // each chunk's float temporaries are freed before the next; its codes move to tmp
                try (NDManager chunk = tmp.newSubManager(table.getDevice())) {
                    NDArray rows = table.get(chunk, new NDIndex(start + ":" + end)); // (n, hidden)
                    QuantizedTensor c = QuantizedTensor.quantize(rows, config.scheme(), groupSize);
                    NDArray w = Temps.copy(rows, chunk, DataType.FLOAT32);
                    NDArray d = c.dequantize(chunk, DataType.FLOAT32); // (n, hidden)
                    signal += w.square().sum().getFloat();
                    noise += w.sub(d).square().sum().getFloat();
                    c.attach(tmp);
                    data.add(c.data());
                    scales.add(c.scales());
                    c.zeros().ifPresent(zeros::add);
                }
            }
            NDArray qData = data.size() == 1 ? data.head() : NDArrays.concat(data, 0);
            NDArray qScales = scales.size() == 1 ? scales.head() : NDArrays.concat(scales, 0);
            NDArray qZeros = zeros.isEmpty() ? null : zeros.size() == 1 ? zeros.head() : NDArrays.concat(zeros, 0);
            q = QuantizedTensor.of(config.scheme(), groupSize, table.getShape(), qData, qScales, qZeros, null);
            q.attach(owner);
        }
        double sqnr = noise == 0 ? Double.POSITIVE_INFINITY : 10 * Math.log10(signal / noise);
        QuantizedEmbedding replacement = QuantizedEmbedding.of(q, table.getDataType(), paramName);
        long before = table.size() * table.getDataType().getNumOfBytes();
        site.replaceCore(old -> replacement);
        if (!kept.contains(param)) {
            param.close();
        }
        return new QuantizationReport.Layer(path, config.scheme(), QuantMethod.RTN, groupSize, before, q.nbytes(), sqnr,
                OptionalDouble.empty(), note, true);
    }
}
