package ai.djl.memopt.export;

import ai.djl.memopt.gguf.DeepSeek2Metadata;
import ai.djl.memopt.gguf.GgufFile;
import ai.djl.memopt.gguf.GgufLoader;
import ai.djl.memopt.gguf.GgufTensorInfo;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Path;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * The bytes each part of a DeepSeek model will take once loaded, read from the headers of its files without loading
 * anything: to split the decoder layers over devices by their memory before the weights are read.
 *
 * <p>Float tensors count at the loaded type's width ({@code dtype}: a BF16 checkpoint loaded as FP32 takes twice its
 * file); integer tensors (an artifact's int8/int4 codes) and GGUF's quantized blocks count as stored. For the
 * quantized GGUF types this is the file's block size, close to what the int8/int4 tensors they become take.
 *
 * <pre>{@code
 * ModelSizes.Sizes s = ModelSizes.of(Path.of("out/int4"), DataType.FLOAT16);
 * long layer0 = s.layers()[0];
 * }</pre>
 */
public final class ModelSizes {

    private static final Pattern HF_LAYER = Pattern.compile("^model\\.layers\\.(\\d+)\\..*");
    private static final Pattern GGUF_LAYER = Pattern.compile("^blk\\.(\\d+)\\..*");

    private ModelSizes() {}

    /**
     * Bytes by part of the model.
     *
     * @param embedding the token embedding ({@code model.embed_tokens})
     * @param layers decoder layer {@code i} ({@code model.layers.i.*}; multi-token-prediction layers are not counted)
     * @param head the final norm and {@code lm_head}
     */
    public record Sizes(long embedding, long[] layers, long head) {

        public Sizes {
            layers = layers.clone();
        }

        @Override
        public long[] layers() {
            return layers.clone();
        }

        /** Everything. */
        public long total() {
            long sum = embedding + head;
            for (long l : layers) {
                sum += l;
            }
            return sum;
        }
    }

    /**
     * Reads the sizes of a checkpoint directory, a quantized artifact or a GGUF file.
     *
     * @param dtype FLOAT32 or FLOAT16: the type float weights are loaded as
     * @throws IOException if the files are missing or malformed
     */
    public static Sizes of(Path path, DataType dtype) throws IOException {
        int width = dtype.getNumOfBytes();
        if (GgufLoader.isGguf(path)) {
            try (GgufFile f = GgufFile.open(path)) {
                int n = DeepSeek2Metadata.config(f).numHiddenLayers();
                long[] acc = new long[n + 2]; // embedding, layers, head
                for (GgufTensorInfo t : f.tensors().values()) {
                    long bytes = t.type().isQuantized() ? t.byteLength() : t.numel() * width;
                    add(acc, n, ggufPart(t.name(), n), bytes);
                }
                return sizes(acc, n);
            }
        }
        DeepSeekConfig config = DeepSeekLoader.readConfig(path);
        int n = config.numHiddenLayers();
        long[] acc = new long[n + 2];
        try (HfCheckpoint ckpt = HfCheckpoint.open(path)) {
            for (String name : ckpt.names()) {
                TensorInfo t = ckpt.info(name);
                long bytes = t.dtype().isFloating() ? t.numel() * width : t.byteLength();
                add(acc, n, hfPart(name, n), bytes);
            }
        }
        return sizes(acc, n);
    }

    /** -1 embedding, 0..n-1 a layer, n the head, -2 not loaded (an MTP layer). */
    private static int hfPart(String name, int n) {
        Matcher m = HF_LAYER.matcher(name);
        if (m.matches()) {
            long layer = Long.parseLong(m.group(1));
            return layer < n ? (int) layer : -2;
        }
        return name.startsWith("model.embed_tokens.") ? -1 : n;
    }

    private static int ggufPart(String name, int n) {
        Matcher m = GGUF_LAYER.matcher(name);
        if (m.matches()) {
            long layer = Long.parseLong(m.group(1));
            return layer < n ? (int) layer : -2;
        }
        return name.startsWith("token_embd.") ? -1 : n;
    }

    private static void add(long[] acc, int n, int part, long bytes) {
        if (part != -2) {
            acc[part + 1] += bytes;
        }
    }

    private static Sizes sizes(long[] acc, int n) {
        long[] layers = new long[n];
        System.arraycopy(acc, 1, layers, 0, n);
        return new Sizes(acc[0], layers, acc[n + 1]);
    }
}
