package ai.djl.memopt.gguf;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import com.google.common.base.Preconditions;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.Optional;

/**
 * Writes a DeepSeek-V2/V3 model as a GGUF file of llama.cpp's {@code deepseek2} architecture
 * ({@link DeepSeek2Metadata}, {@link DeepSeek2Tensors}, {@link GgufTokenizer}).
 *
 * <p>Tensor types follow llama.cpp's converter for a file type: vectors, norms and the router stay F32; every other
 * matrix takes the file type, except that a Q8_0/Q4_0 matrix whose rows are not whole blocks of 32 (MLA's
 * {@code attn_k_b} with {@code qk_nope_head_dim} 16 in the tiny fixtures) falls back to F16, as llama.cpp's converter
 * does. Quantized layers of the source model (an artifact, or a GGUF loaded natively) are dequantized and re-encoded,
 * except where they already are exactly Q8_0/Q4_0 blocks ({@link GgufBlocks#toGgml}), which are copied.
 *
 * <pre>{@code
 * GgufExporter.Report r = GgufExporter.export(lm, modelDir, GgmlType.Q4_0, Path.of("model-q4_0.gguf"), null);
 * }</pre>
 */
public final class GgufExporter {

    /** What was written: every tensor's GGUF name, type and dimensions, and the tokenizer. */
    public record Report(Path file, GgmlType fileType, List<TensorEntry> tensors, String tokenizerPre,
            long bytes) {
        /** Names of the matrices written in another type than the file's (F16 fallbacks). */
        public List<String> fallbacks() {
            List<String> out = new ArrayList<>();
            for (TensorEntry t : tensors) {
                if (t.type() != fileType && t.type() != GgmlType.F32) {
                    out.add(t.name() + " (" + t.type() + ")");
                }
            }
            return out;
        }
    }

    /** One written tensor. */
    public record TensorEntry(String name, GgmlType type, long[] ne) {}

    private GgufExporter() {}

    /**
     * Exports {@code lm}.
     *
     * @param sourceDir the model's directory, for its tokenizer files (null: none)
     * @param type F32, F16, Q8_0 or Q4_0
     * @param pre llama.cpp's pre-tokenizer name, or null to recognise it; {@link GgufTokenizer#NONE} writes llama.cpp's
     *     no-vocabulary mode for a model without a tokenizer (else a placeholder byte vocabulary)
     * @throws IllegalArgumentException for a config llama.cpp cannot express
     * @throws IOException if the tokenizer cannot be converted or the file cannot be written
     */
    public static Report export(DeepSeekForCausalLM lm, Path sourceDir, GgmlType type, Path out, String pre)
            throws IOException {
        Preconditions.checkArgument(type != GgmlType.BF16, "BF16 export is not supported (F32, F16, Q8_0, Q4_0)");
        DeepSeekConfig c = lm.config();
        GgufWriter w = new GgufWriter();
        String name = sourceDir != null && sourceDir.getFileName() != null ? sourceDir.getFileName().toString()
                : "deepseek";
        DeepSeek2Metadata.write(w, c, name, type);
        String tokenizer = GgufTokenizer.write(w, sourceDir, c.vocabSize(), pre);
        List<TensorEntry> entries = new ArrayList<>();
        Weights weights = new Weights(lm);
        int[] ropePerm = DeepSeek2Tensors.ropePermutation(c);
        // the model's names in order, from an unallocated copy (quantized layers have no weight parameter)
        for (String hf : BlockTrees.parameters(new DeepSeekForCausalLM(c)).keySet()) {
            DeepSeek2Tensors.Source s = DeepSeek2Tensors.source(hf);
            switch (s.kind()) {
                case DIRECT:
                    long[] shape = weights.shape(hf);
                    long[] ne = DeepSeek2Tensors.reverse(shape);
                    GgmlType t = typeFor(s.gguf(), ne, type);
                    int[] perm = ropeRows(hf, c, ropePerm);
                    entries.add(new TensorEntry(s.gguf(), t, ne));
                    w.addTensor(s.gguf(), t, ne, os -> weights.write(hf, t, perm, os));
                    break;
                case EXPERT:
                    if (s.expert() == 0) {
                        long[] one = weights.shape(hf);
                        long[] stacked = {one[1], one[0], c.nRoutedExperts()};
                        GgmlType te = typeFor(s.gguf(), stacked, type);
                        entries.add(new TensorEntry(s.gguf(), te, stacked));
                        w.addTensor(s.gguf(), te, stacked, os -> {
                            for (int e = 0; e < c.nRoutedExperts(); e++) {
                                weights.write(hf.replace(".experts.0.", ".experts." + e + "."), te, null, os);
                            }
                        });
                    }
                    break;
                case KV_B:
                    addKvB(w, entries, weights, hf, s.gguf(), c, type);
                    break;
                default:
                    throw new IllegalStateException(s.kind().toString());
            }
        }
        w.write(out);
        return new Report(out, type, Collections.unmodifiableList(entries), tokenizer, java.nio.file.Files.size(out));
    }

    /**
     * Writes a vocabulary-only GGUF file (metadata and tokenizer, no tensors), as llama.cpp's converter does with
     * {@code --vocab-only}: for tokenizer tests and tools that only tokenize.
     *
     * @return the pre-tokenizer name written
     */
    public static String exportVocabulary(DeepSeekConfig c, Path tokenizerDir, Path out, String pre)
            throws IOException {
        GgufWriter w = new GgufWriter();
        DeepSeek2Metadata.write(w, c, "vocabulary", GgmlType.F32);
        String name = GgufTokenizer.write(w, tokenizerDir, c.vocabSize(), pre);
        w.write(out);
        return name;
    }

    /** Splits kv_b_proj (heads * (nope + v), kv_lora) into attn_k_b (transposed) and attn_v_b. */
    private static void addKvB(GgufWriter w, List<TensorEntry> entries, Weights weights, String hf, String kbName,
            DeepSeekConfig c, GgmlType type) {
        long[][] dims = DeepSeek2Tensors.kvBDims(c);
        String[] names = {kbName, DeepSeek2Tensors.valueHalf(kbName)};
        for (int half = 0; half < 2; half++) {
            int which = half;
            GgmlType t = typeFor(names[half], dims[half], type);
            entries.add(new TensorEntry(names[half], t, dims[half]));
            w.addTensor(names[half], t, dims[half], os -> encode(t,
                    DeepSeek2Tensors.splitKvB(weights.floats(hf), c)[which], (int) dims[which][0], os));
        }
    }

    /** The type of a tensor in a file of type {@code fileType}, as llama.cpp's converter chooses it. */
    static GgmlType typeFor(String gguf, long[] ne, GgmlType fileType) {
        if (DeepSeek2Tensors.alwaysF32(gguf, ne)) {
            return GgmlType.F32;
        }
        if (fileType.isQuantized() && ne[0] % fileType.blockSize() != 0) {
            return GgmlType.F16;
        }
        return fileType;
    }

    /** The rotary rows to permute in a projection's output (V3 with rope_interleave false), else null. */
    private static int[] ropeRows(String hf, DeepSeekConfig c, int[] ropePerm) {
        if (ropePerm == null) {
            return null;
        }
        int rope = c.qkRopeHeadDim();
        if (hf.endsWith("q_b_proj.weight") || hf.endsWith("self_attn.q_proj.weight")) {
            int head = c.qkHeadDim();
            int[] rows = identity(c.numAttentionHeads() * head);
            for (int h = 0; h < c.numAttentionHeads(); h++) {
                for (int i = 0; i < rope; i++) {
                    rows[h * head + c.qkNopeHeadDim() + i] = h * head + c.qkNopeHeadDim() + ropePerm[i];
                }
            }
            return rows;
        }
        if (hf.endsWith("kv_a_proj_with_mqa.weight")) {
            int[] rows = identity(c.kvLoraRank() + rope);
            for (int i = 0; i < rope; i++) {
                rows[c.kvLoraRank() + i] = c.kvLoraRank() + ropePerm[i];
            }
            return rows;
        }
        return null;
    }

    private static int[] identity(int n) {
        int[] r = new int[n];
        for (int i = 0; i < n; i++) {
            r[i] = i;
        }
        return r;
    }

    static void encode(GgmlType type, float[] values, int rowLength, OutputStream os) throws IOException {
        int rowsPerChunk = Math.max(1, (1 << 20) / rowLength);
        int rows = values.length / rowLength;
        for (int r = 0; r < rows; r += rowsPerChunk) {
            int n = Math.min(rowsPerChunk, rows - r) * rowLength;
            ByteBuffer buf = ByteBuffer.allocate((int) type.rowBytes(n)).order(ByteOrder.LITTLE_ENDIAN);
            GgmlQuants.quantize(type, values, r * rowLength, n, buf);
            os.write(buf.array(), 0, buf.position());
        }
    }

    /** Reads a model's weights by Hugging Face name, whether float parameters or quantized layers. */
    private static final class Weights {
        private final DeepSeekForCausalLM lm;
        private final Map<String, Parameter> params;

        Weights(DeepSeekForCausalLM lm) {
            this.lm = lm;
            this.params = BlockTrees.parameters(lm);
        }

        long[] shape(String hf) {
            Parameter p = params.get(hf);
            if (p != null) {
                return p.getArray().getShape().getShape();
            }
            Block b = owner(hf);
            if (b instanceof QuantizedLinear) {
                return ((QuantizedLinear) b).quantizedWeight().shape().getShape();
            }
            if (b instanceof QuantizedEmbedding) {
                return ((QuantizedEmbedding) b).quantizedTable().shape().getShape();
            }
            throw new IllegalArgumentException("the model has no tensor '" + hf + "'");
        }

        private Block owner(String hf) {
            return BlockTrees.get(lm, hf.substring(0, hf.lastIndexOf('.')));
        }

        Optional<QuantizedTensor> quantized(String hf) {
            if (params.containsKey(hf)) {
                return Optional.empty();
            }
            Block b = owner(hf);
            if (b instanceof QuantizedLinear) {
                return Optional.of(((QuantizedLinear) b).quantizedWeight());
            }
            if (b instanceof QuantizedEmbedding) {
                return Optional.of(((QuantizedEmbedding) b).quantizedTable());
            }
            return Optional.empty();
        }

        float[] floats(String hf) {
            Parameter p = params.get(hf);
            if (p != null) {
                NDArray a = p.getArray();
                if (a.getDataType() == DataType.FLOAT32) {
                    return a.toFloatArray();
                }
                try (NDArray f = a.toType(DataType.FLOAT32, true)) {
                    return f.toFloatArray();
                }
            }
            Block b = owner(hf);
            try (NDManager tmp = lm.manager().newSubManager()) {
                NDArray wgt = b instanceof QuantizedEmbedding ? ((QuantizedEmbedding) b).table(tmp)
                        : LinearWeightSource.weightOf(b, tmp);
                return wgt.toType(DataType.FLOAT32, false).toFloatArray();
            }
        }

        void write(String hf, GgmlType type, int[] rowPerm, OutputStream os) throws IOException {
            if (rowPerm == null && type.isQuantized()) {
                Optional<QuantizedTensor> q = quantized(hf);
                Optional<byte[]> exact = q.isPresent() ? GgufBlocks.toGgml(q.get(), type) : Optional.empty();
                if (exact.isPresent()) {
                    os.write(exact.get());
                    return;
                }
            }
            long[] shape = shape(hf);
            float[] v = floats(hf);
            int in = (int) shape[shape.length - 1];
            if (rowPerm != null) {
                float[] p = new float[v.length];
                for (int r = 0; r < rowPerm.length; r++) {
                    System.arraycopy(v, rowPerm[r] * in, p, r * in, in);
                }
                v = p;
            }
            encode(type, v, in, os);
        }
    }
}
