package ai.djl.memopt.export;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.LayerPlacement;
import ai.djl.memopt.quantize.Int4Packing;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Sparse24;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.Locale;

/**
 * A self-contained directory holding a quantized (and/or 2:4-pruned) model:
 *
 * <ul>
 *   <li>{@code model.safetensors} (or, past {@link ExportOptions#maxShardBytes()}, Hugging Face shards
 *       {@code model-0000i-of-0000n.safetensors} with {@code model.safetensors.index.json}): for every {@link QuantizedLinear} at block path {@code p}: {@code p.qweight}
 *       (INT8 {@code (out, in)} or packed UINT8 {@code (out, in/2)}, {@link Int4Packing} order), {@code p.scales}
 *       (F32 {@code (out, in/g)}), {@code p.zeros} (int4: U8 {@code (out, in/g)}), {@code p.input_scales} (AWQ: F32
 *       {@code (in)}), {@code p.bias}; for every 2:4 layer {@code p.sparse24_values} and {@code p.sparse24_indices}
 *       ({@link Sparse24} layout); for every {@link QuantizedEmbedding} at path {@code p} (format version 2):
 *       {@code p.qweight}, {@code p.scales}, {@code p.zeros} (int4) of the {@code (vocab, hidden)} table, laid out as
 *       a Linear weight with rows = tokens; every other parameter verbatim under its path (for the DeepSeek model these are
 *       the Hugging Face tensor names).
 *   <li>{@code config.json}: the source model's, copied (when given).
 *   <li>{@code quantization.json}: format and version, library version, packing order, per-layer scheme, group size,
 *       method, shape and dtype, sha256 of the source checkpoint files and of every artifact file.
 * </ul>
 *
 * <p>An export writes every file into a fresh sibling directory, {@code quantization.json} last, which then replaces
 * the directory as a whole: a crash at any point leaves the old artifact or the new one, complete (docs/artifact-format.md,
 * "Crash safety"). {@link #load} verifies format version and checksums, then checks every tensor's presence, type,
 * shape and value range against the block before changing it, and reports exactly what is wrong.
 *
 * <pre>{@code
 * Quantizer.quantize(model, Int4WeightOnlyConfig.builder().build());
 * QuantizedArtifact.export(model, dir, ExportOptions.builder().build());
 * Block fresh = buildSameArchitecture();            // initialized, any weights
 * QuantizedArtifact.load(dir, fresh);               // fresh now computes exactly what model computed
 * }</pre>
 */
public final class QuantizedArtifact {

    /** Format name in quantization.json. */
    public static final String FORMAT = "djl-memopt-quantized";
    /**
     * The newest format version this library reads and writes: 2 adds quantized embedding tables ({@code embeddings}).
     * An artifact without one is written as version 1, which every reader of version 1 still reads.
     */
    public static final int FORMAT_VERSION = 2;
    /** The oldest format version this library reads. */
    public static final int MIN_FORMAT_VERSION = 1;
    /** The first format version with quantized embedding tables. */
    static final int EMBEDDINGS_VERSION = 2;
    /** The library version recorded in artifacts. */
    public static final String LIBRARY_VERSION = "0.1.0-SNAPSHOT";
    /** Weights file name. */
    public static final String WEIGHTS = "model.safetensors";
    /** Metadata file name. */
    public static final String METADATA = "quantization.json";
    /** Model config file name. */
    public static final String CONFIG = "config.json";
    /** Architecture name of artifacts of {@link DeepSeekForCausalLM}. */
    public static final String DEEPSEEK = "deepseek";

    static final String INT4_PACKING = "uint8, row-major over (out, in): element 2i in the low nibble, element 2i+1"
            + " in the high nibble; byte = v[2i] + 16 * v[2i+1]; dequant w = (q - zero) * scale per group of"
            + " group_size consecutive inputs of a row, then / input_scales[in] when present (AWQ)";
    static final String INT8_LAYOUT = "int8 (out, in), symmetric, w = q * scales[out]";
    static final String EMBEDDING_LAYOUT = "table (vocab, hidden) stored like a Linear weight (out, in) with rows ="
            + " tokens: int8 per row, or int4 per group of group_size consecutive hidden values of a row; the"
            + " dequantized table replaces p.<parameter>";
    static final String SPARSE24_LAYOUT = "group j = columns 4j..4j+3 of a row keeps positions p0 < p1:"
            + " values[r, 2j] = w[r, 4j+p0], values[r, 2j+1] = w[r, 4j+p1]; nibble j = p0 + 4 * p1, nibbles packed"
            + " two per byte, group 2k in the low nibble of byte k, 2k+1 in the high nibble";

    private QuantizedArtifact() {}

    /**
     * Writes the artifact of {@code root} (quantized and/or pruned in memory) to {@code dir}.
     *
     * @return the manifest written
     * @throws IOException if writing fails ({@code dir} is then left as it was), or {@code dir} holds anything but an
     *     artifact: model weights that are not one (a source checkpoint is never overwritten), other files, or files
     *     its manifest does not list (replacing the directory would delete them)
     * @throws IllegalArgumentException if a 2:4 layer named in the options is not a 2:4-sparse Linear
     */
    public static ArtifactManifest export(Block root, Path dir, ExportOptions options) throws IOException {
        return ArtifactWriter.write(root, dir, options);
    }

    /**
     * Reads {@code quantization.json} and verifies the format version and the sha256 of every listed file.
     *
     * @throws QuantizedArtifactException naming the missing file, bad field or checksum mismatch
     */
    public static ArtifactManifest verify(Path dir) throws IOException {
        return ArtifactVerifier.verify(dir);
    }

    /**
     * Reads and checks {@code quantization.json} without computing any checksum (cheap; {@link #verify} before use).
     *
     * @throws QuantizedArtifactException naming the missing file or bad field
     */
    public static ArtifactManifest readManifest(Path dir) throws IOException {
        return ArtifactVerifier.readManifest(dir);
    }

    /**
     * Loads an artifact into {@code block}, a freshly built and initialized block of the same architecture (its
     * weights are overwritten): quantized layers replace its Linear layers, 2:4 layers are decompressed into them,
     * every other parameter is copied in (converted to the parameter's type). Everything is checked before the block
     * is changed, so a mismatched artifact leaves it untouched.
     *
     * @return the verified manifest
     * @throws QuantizedArtifactException naming the file, tensor, layer or field that is wrong
     */
    public static ArtifactManifest load(Path dir, Block block) throws IOException {
        ArtifactManifest manifest = ArtifactVerifier.verify(dir);
        ArtifactLoader.load(dir, block, manifest);
        return manifest;
    }

    /**
     * Loads a DeepSeek artifact on its own: the model is built from the artifact's {@code config.json}, the weights of
     * its quantized layers are never allocated in float (1-element placeholders until replaced), every other
     * parameter is read from the artifact.
     *
     * @param dtype FLOAT32 or FLOAT16, the type of the unquantized weights
     * @throws QuantizedArtifactException for an artifact of another architecture or any corruption (see {@link #load})
     */
    public static DeepSeekForCausalLM loadDeepSeek(Path dir, NDManager manager, DataType dtype) throws IOException {
        return ArtifactLoader.loadDeepSeek(dir, LayerPlacement.single(manager), dtype);
    }

    /** {@link #loadDeepSeek(Path, NDManager, DataType)} with each weight on its stage's manager of {@code placement}. */
    public static DeepSeekForCausalLM loadDeepSeek(Path dir, LayerPlacement placement, DataType dtype)
            throws IOException {
        return ArtifactLoader.loadDeepSeek(dir, placement, dtype);
    }

    /** Hex sha256 of a file, streamed. */
    public static String sha256(Path file) throws IOException {
        MessageDigest md;
        try {
            md = MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
        byte[] buf = new byte[1 << 20];
        try (InputStream in = Files.newInputStream(file)) {
            int n;
            while ((n = in.read(buf)) > 0) {
                md.update(buf, 0, n);
            }
        }
        StringBuilder b = new StringBuilder();
        for (byte x : md.digest()) {
            b.append(String.format(Locale.ROOT, "%02x", x & 0xFF));
        }
        return b.toString();
    }

    static String join(String path, String name) {
        return path.isEmpty() ? name : path + "." + name;
    }

    static String parentOf(String name) {
        int dot = name.lastIndexOf('.');
        return dot < 0 ? "" : name.substring(0, dot);
    }
}
