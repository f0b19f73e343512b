package ai.djl.memopt.export;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.quantize.Int4Packing;
import ai.djl.memopt.quantize.QuantMethod;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.memopt.quantize.Sparse24;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.training.initializer.Initializer;
import com.google.common.base.Preconditions;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;

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
 * <p>Every file is written atomically (temporary file, then rename); {@code quantization.json} is deleted first and
 * written last, so an interrupted export never looks complete, and files from an older export fail the checksums.
 * {@link #load} verifies format version and checksums, then checks every tensor's presence, type and shape against
 * the block before changing it, and reports exactly what is wrong.
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
     * @throws IOException if writing fails (nothing that looks complete is left behind), or {@code dir} holds model
     *     weights that are not an artifact (a source checkpoint is never overwritten)
     * @throws IllegalArgumentException if a 2:4 layer named in the options is not a 2:4-sparse Linear
     */
    public static ArtifactManifest export(Block root, Path dir, ExportOptions options) throws IOException {
        Files.createDirectories(dir);
        boolean hasWeights = Files.exists(dir.resolve(WEIGHTS)) || Files.exists(dir.resolve(HfCheckpoint.INDEX_FILE));
        if (hasWeights && !Files.exists(dir.resolve(METADATA))) {
            // never replace a model's own checkpoint (e.g. --out pointing at the source directory)
            throw new IOException(dir + " holds model weights that are not a quantized artifact (no " + METADATA
                    + "); refusing to overwrite them: export to another directory");
        }
        Files.deleteIfExists(dir.resolve(METADATA));
        Map<String, Block> blocks = Blocks.walk(root);
        ShardedWriter writer = new ShardedWriter();
        List<String> weightFiles;
        JsonObject layers = new JsonObject();
        JsonObject sparse = new JsonObject();
        JsonObject embeddings = new JsonObject();
        Set<String> sparseWeights = new HashSet<>();
        List<Sparse24> compressed = new ArrayList<>();
        try {
            for (String path : options.sparse24Layers()) {
                Block b = blocks.get(path);
                if (!(b instanceof Linear)) {
                    throw new IllegalArgumentException("2:4 layer '" + path + "' is "
                            + (b == null ? "not in the block" : "a " + b.getClass().getSimpleName() + ", not a Linear"));
                }
                NDArray w = b.getParameters().get("weight").getArray();
                Sparse24 s;
                try {
                    s = Sparse24.compress(w);
                } catch (IllegalArgumentException e) {
                    throw new IllegalArgumentException("layer '" + path + "': " + e.getMessage(), e);
                }
                compressed.add(s);
                writer.add(path + ".sparse24_values", s.values());
                writer.add(path + ".sparse24_indices", s.indices());
                sparseWeights.add(join(path, "weight"));
                JsonObject e = new JsonObject();
                e.add("shape", shapeJson(w.getShape()));
                e.addProperty("dtype", dtypeName(w.getDataType()));
                sparse.add(path, e);
            }
            for (Map.Entry<String, Parameter> p : Blocks.parameters(root).entrySet()) {
                if (!sparseWeights.contains(p.getKey())) {
                    writer.add(p.getKey(), p.getValue().getArray());
                }
            }
            for (Map.Entry<String, Block> e : blocks.entrySet()) {
                if (!(e.getValue() instanceof QuantizedLinear)) {
                    continue;
                }
                String path = e.getKey();
                QuantizedLinear ql = (QuantizedLinear) e.getValue();
                QuantizedTensor q = ql.quantizedWeight();
                writer.add(join(path, "qweight"), q.data());
                writer.add(join(path, "scales"), q.scales());
                q.zeros().ifPresent(z -> writer.add(join(path, "zeros"), z));
                q.inputScales().ifPresent(s -> writer.add(join(path, "input_scales"), s));
                ql.bias().ifPresent(b -> writer.add(join(path, "bias"), b));
                JsonObject l = new JsonObject();
                l.addProperty("scheme", q.scheme().id());
                l.addProperty("group_size", q.groupSize());
                l.addProperty("method", ql.method().id());
                l.addProperty("input_scales", q.inputScales().isPresent());
                l.add("shape", shapeJson(q.shape()));
                l.addProperty("weight_dtype", dtypeName(ql.weightType()));
                l.addProperty("bias", ql.bias().isPresent());
                layers.add(path, l);
            }
            for (Map.Entry<String, Block> e : blocks.entrySet()) {
                if (!(e.getValue() instanceof QuantizedEmbedding)) {
                    continue;
                }
                String path = e.getKey();
                QuantizedEmbedding qe = (QuantizedEmbedding) e.getValue();
                QuantizedTensor q = qe.quantizedTable();
                writer.add(join(path, "qweight"), q.data());
                writer.add(join(path, "scales"), q.scales());
                q.zeros().ifPresent(z -> writer.add(join(path, "zeros"), z));
                JsonObject l = new JsonObject();
                l.addProperty("scheme", q.scheme().id());
                l.addProperty("group_size", q.groupSize());
                l.add("shape", shapeJson(q.shape()));
                l.addProperty("weight_dtype", dtypeName(qe.outputType()));
                l.addProperty("parameter", qe.parameterName());
                embeddings.add(path, l);
            }
            weightFiles = writer.write(dir, options.maxShardBytes(), FORMAT);
        } finally {
            for (Sparse24 s : compressed) {
                s.values().close();
                s.indices().close();
            }
        }
        JsonObject files = new JsonObject();
        for (String f : weightFiles) {
            files.addProperty(f, sha256(dir.resolve(f)));
        }
        if (options.configJson() != null) {
            AtomicFiles.copy(options.configJson(), dir.resolve(CONFIG));
            files.addProperty(CONFIG, sha256(dir.resolve(CONFIG)));
        } else if (root instanceof DeepSeekForCausalLM) {
            AtomicFiles.write(dir.resolve(CONFIG),
                    ((DeepSeekForCausalLM) root).config().toJson().getBytes(StandardCharsets.UTF_8));
            files.addProperty(CONFIG, sha256(dir.resolve(CONFIG)));
        }
        for (Path companion : options.companionFiles()) {
            String name = companion.getFileName().toString();
            Preconditions.checkArgument(!name.equals(CONFIG) && !name.equals(METADATA) && !files.has(name),
                    "companion file %s would overwrite the artifact's own %s", companion, name);
            AtomicFiles.copy(companion, dir.resolve(name));
            files.addProperty(name, sha256(dir.resolve(name)));
        }
        String architecture = options.architecture() != null ? options.architecture()
                : root instanceof DeepSeekForCausalLM ? DEEPSEEK : "generic";
        JsonObject sources = new JsonObject();
        for (Path f : options.sourceFiles()) {
            sources.addProperty(f.getFileName().toString(), sha256(f));
        }
        JsonObject meta = new JsonObject();
        meta.addProperty("format", FORMAT);
        // version 1 when there is nothing a version-1 reader would not understand
        meta.addProperty("format_version", embeddings.size() == 0 ? MIN_FORMAT_VERSION : EMBEDDINGS_VERSION);
        meta.addProperty("library", "djl-memopt");
        meta.addProperty("library_version", LIBRARY_VERSION);
        meta.addProperty("architecture", architecture);
        meta.addProperty("weights", weightFiles.size() == 1 ? WEIGHTS : HfCheckpoint.INDEX_FILE);
        JsonObject packing = new JsonObject();
        packing.addProperty("int4", INT4_PACKING);
        packing.addProperty("int8", INT8_LAYOUT);
        packing.addProperty("sparse24", SPARSE24_LAYOUT);
        if (embeddings.size() > 0) {
            packing.addProperty("embedding", EMBEDDING_LAYOUT);
        }
        meta.add("packing", packing);
        meta.add("layers", layers);
        if (embeddings.size() > 0) {
            meta.add("embeddings", embeddings);
        }
        meta.add("sparse24", sparse);
        meta.add("source_files", sources);
        meta.add("files", files);
        if (options.extraJson() != null) {
            meta.add("reports", JsonParser.parseString(options.extraJson()));
        }
        AtomicFiles.write(dir.resolve(METADATA),
                new GsonBuilder().setPrettyPrinting().disableHtmlEscaping().create().toJson(meta).getBytes(StandardCharsets.UTF_8));
        return parse(dir, meta);
    }

    /**
     * Reads {@code quantization.json} and verifies the format version and the sha256 of every listed file.
     *
     * @throws QuantizedArtifactException naming the missing file, bad field or checksum mismatch
     */
    public static ArtifactManifest verify(Path dir) throws IOException {
        Path metaFile = dir.resolve(METADATA);
        if (!Files.isRegularFile(metaFile)) {
            throw new QuantizedArtifactException(dir + ": missing " + METADATA
                    + " (not a quantized artifact, or its export did not finish)");
        }
        JsonObject meta;
        try {
            JsonElement e = JsonParser.parseString(Files.readString(metaFile, StandardCharsets.UTF_8));
            if (!e.isJsonObject()) {
                throw new QuantizedArtifactException(metaFile + ": not a JSON object");
            }
            meta = e.getAsJsonObject();
        } catch (JsonParseException e) {
            throw new QuantizedArtifactException(metaFile + ": invalid JSON: " + e.getMessage(), e);
        }
        ArtifactManifest manifest = parse(dir, meta);
        if (!manifest.files().containsKey(WEIGHTS) && !manifest.files().containsKey(HfCheckpoint.INDEX_FILE)) {
            throw new QuantizedArtifactException(metaFile + ": 'files' lists neither " + WEIGHTS + " nor "
                    + HfCheckpoint.INDEX_FILE);
        }
        for (Map.Entry<String, String> f : manifest.files().entrySet()) {
            if (f.getKey().contains("/") || f.getKey().contains("\\") || f.getKey().startsWith(".")) {
                throw new QuantizedArtifactException(metaFile + ": file name '" + f.getKey()
                        + "' must be a plain name inside the artifact directory");
            }
            Path p = dir.resolve(f.getKey());
            if (!Files.isRegularFile(p)) {
                throw new QuantizedArtifactException(dir + ": missing file " + f.getKey() + " listed in " + METADATA);
            }
            String actual = sha256(p);
            if (!actual.equals(f.getValue())) {
                throw new QuantizedArtifactException(p + ": sha256 mismatch (file corrupt or replaced): expected "
                        + f.getValue() + ", got " + actual);
            }
        }
        return manifest;
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
        ArtifactManifest manifest = verify(dir);
        load(dir, block, manifest);
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
        ArtifactManifest manifest = verify(dir);
        if (!DEEPSEEK.equals(manifest.architecture())) {
            throw new QuantizedArtifactException(dir + ": artifact architecture is '" + manifest.architecture()
                    + "', not '" + DEEPSEEK + "'");
        }
        if (!manifest.files().containsKey(CONFIG)) {
            throw new QuantizedArtifactException(dir + ": a DeepSeek artifact needs config.json (not listed in "
                    + METADATA + ")");
        }
        DeepSeekConfig config;
        try {
            config = DeepSeekConfig.fromJson(dir.resolve(CONFIG));
        } catch (IllegalArgumentException e) {
            throw new QuantizedArtifactException(dir.resolve(CONFIG) + ": " + e.getMessage(), e);
        }
        DeepSeekForCausalLM lm = new DeepSeekForCausalLM(config);
        Set<String> placeholders = new HashSet<>();
        manifest.layers().keySet().forEach(p -> placeholders.add(join(p, "weight")));
        manifest.embeddings().forEach((p, e) -> placeholders.add(join(p, e.parameter())));
        Initializer placeholder = (m, shape, type) -> m.zeros(new Shape(1), type);
        lm.initializeWith(manager, dtype, name -> placeholders.contains(name) ? placeholder : Initializer.ZEROS);
        try {
            load(dir, lm, manifest);
        } catch (IOException | RuntimeException e) {
            for (Parameter p : Blocks.parameters(lm).values()) {
                p.close();
            }
            Blocks.walk(lm).values().stream().filter(b -> b instanceof QuantizedLinear)
                    .forEach(b -> ((QuantizedLinear) b).close());
            Blocks.walk(lm).values().stream().filter(b -> b instanceof QuantizedEmbedding)
                    .forEach(b -> ((QuantizedEmbedding) b).close());
            throw e;
        }
        return lm;
    }

    private static void load(Path dir, Block block, ArtifactManifest manifest) throws IOException {
        Map<String, Parameter> params = Blocks.parameters(block);
        try (HfCheckpoint st = HfCheckpoint.open(dir)) {
            for (Map.Entry<String, ArtifactManifest.LayerEntry> e : manifest.layers().entrySet()) {
                String path = e.getKey();
                ArtifactManifest.LayerEntry l = e.getValue();
                Linear linear = linearAt(block, path, "quantized layer");
                Shape wShape = linear.getParameters().get("weight").getShape();
                if (!wShape.equals(l.shape())) {
                    throw new QuantizedArtifactException("layer '" + path + "': artifact weight shape " + l.shape()
                            + " but the block's Linear has " + wShape);
                }
                long out = l.shape().get(0);
                long in = l.shape().get(1);
                expectQuantized(st, path, l.scheme(), l.groupSize(), l.shape(), "layer '" + path + "'");
                if (l.inputScales()) {
                    expect(st, join(path, "input_scales"), SafetensorsDType.F32, new Shape(in));
                }
                boolean blockHasBias = linear.getParameters().contains("bias");
                if (l.bias() != blockHasBias) {
                    throw new QuantizedArtifactException("layer '" + path + "': artifact " + (l.bias() ? "has" : "has no")
                            + " bias but the block's Linear " + (blockHasBias ? "has one" : "has none"));
                }
                if (l.bias()) {
                    expectFloat(st, join(path, "bias"), new Shape(out));
                }
            }
            for (Map.Entry<String, Shape> e : manifest.sparse24().entrySet()) {
                String path = e.getKey();
                Linear linear = linearAt(block, path, "2:4 layer");
                Shape wShape = linear.getParameters().get("weight").getShape();
                if (!wShape.equals(e.getValue())) {
                    throw new QuantizedArtifactException("2:4 layer '" + path + "': artifact shape " + e.getValue()
                            + " but the block's Linear has " + wShape);
                }
                long out = wShape.get(0);
                long in = wShape.get(1);
                expectFloat(st, join(path, "sparse24_values"), new Shape(out, in / 2));
                expect(st, join(path, "sparse24_indices"), SafetensorsDType.U8, new Shape(out, in / 8));
            }
            for (Map.Entry<String, ArtifactManifest.EmbeddingEntry> e : manifest.embeddings().entrySet()) {
                String path = e.getKey();
                ArtifactManifest.EmbeddingEntry l = e.getValue();
                Parameter table = embeddingAt(block, path);
                String where = "embedding '" + path + "'";
                if (!table.getName().equals(l.parameter())) {
                    throw new QuantizedArtifactException(where + ": artifact table parameter '" + l.parameter()
                            + "' but the block's is '" + table.getName() + "'");
                }
                if (!table.getShape().equals(l.shape())) {
                    throw new QuantizedArtifactException(where + ": artifact table shape " + l.shape()
                            + " but the block's embedding has " + table.getShape());
                }
                expectQuantized(st, path, l.scheme(), l.groupSize(), l.shape(), where);
            }
            Set<String> used = new HashSet<>();
            for (String path : manifest.embeddings().keySet()) {
                for (String t : new String[] {"qweight", "scales", "zeros"}) {
                    used.add(join(path, t));
                }
            }
            for (String path : manifest.layers().keySet()) {
                for (String t : new String[] {"qweight", "scales", "zeros", "input_scales", "bias"}) {
                    used.add(join(path, t));
                }
            }
            for (String path : manifest.sparse24().keySet()) {
                used.add(join(path, "sparse24_values"));
                used.add(join(path, "sparse24_indices"));
            }
            for (Map.Entry<String, Parameter> p : params.entrySet()) {
                String owner = parentOf(p.getKey());
                if (manifest.layers().containsKey(owner) || manifest.embeddings().containsKey(owner)
                        || (manifest.sparse24().containsKey(owner) && p.getKey().endsWith(".weight"))) {
                    continue; // replaced by the quantized layer or table, or filled from the compact 2:4 form
                }
                expectFloatOrSame(st, p.getKey(), p.getValue());
                used.add(p.getKey());
            }
            Set<String> unexpected = new TreeSet<>(st.names());
            unexpected.removeAll(used);
            if (!unexpected.isEmpty()) {
                throw new QuantizedArtifactException(dir + ": tensors the block has no place for: "
                        + abbreviate(unexpected) + " (artifact of a different architecture?)");
            }

            // everything checked: change the block
            for (Map.Entry<String, ArtifactManifest.LayerEntry> e : manifest.layers().entrySet()) {
                String path = e.getKey();
                ArtifactManifest.LayerEntry l = e.getValue();
                Linear linear = (Linear) Blocks.get(block, path);
                Parameter w = linear.getParameters().get("weight");
                NDManager m = w.getArray().getManager();
                NDArray data = st.load(m, join(path, "qweight"));
                NDArray scales = st.load(m, join(path, "scales"));
                NDArray zeros = l.scheme() == QuantScheme.INT4_WEIGHT_ONLY ? st.load(m, join(path, "zeros")) : null;
                NDArray inputScales = l.inputScales() ? st.load(m, join(path, "input_scales")) : null;
                QuantizedTensor q;
                try {
                    q = QuantizedTensor.of(l.scheme(), l.groupSize(), l.shape(), data, scales, zeros, inputScales);
                } catch (IllegalArgumentException ex) {
                    throw new QuantizedArtifactException("layer '" + path + "': " + ex.getMessage(), ex);
                }
                DataType weightType = w.getArray().getDataType();
                NDArray bias = null;
                if (l.bias()) {
                    Parameter b = linear.getParameters().get("bias");
                    bias = st.load(m, join(path, "bias"), b.getArray().getDataType());
                    b.close();
                }
                w.close();
                QuantizedLinear replacement = QuantizedLinear.of(q, bias, weightType, QuantMethod.fromId(l.method()));
                Blocks.replace(block, path, old -> replacement);
            }
            for (Map.Entry<String, ArtifactManifest.EmbeddingEntry> e : manifest.embeddings().entrySet()) {
                String path = e.getKey();
                ArtifactManifest.EmbeddingEntry l = e.getValue();
                Parameter table = QuantizedEmbedding.tableParameter(Blocks.get(block, path));
                NDManager m = table.getArray().getManager();
                NDArray data = st.load(m, join(path, "qweight"));
                NDArray scales = st.load(m, join(path, "scales"));
                NDArray zeros = l.scheme() == QuantScheme.INT4_WEIGHT_ONLY ? st.load(m, join(path, "zeros")) : null;
                QuantizedTensor q;
                try {
                    q = QuantizedTensor.of(l.scheme(), l.groupSize(), l.shape(), data, scales, zeros, null);
                } catch (IllegalArgumentException ex) {
                    throw new QuantizedArtifactException("embedding '" + path + "': " + ex.getMessage(), ex);
                }
                DataType type = table.getArray().getDataType();
                table.close();
                QuantizedEmbedding replacement = QuantizedEmbedding.of(q, type, l.parameter());
                Blocks.replace(block, path, old -> replacement);
            }
            for (String path : manifest.sparse24().keySet()) {
                Linear linear = (Linear) Blocks.get(block, path);
                NDArray w = linear.getParameters().get("weight").getArray();
                try (NDManager tmp = w.getManager().newSubManager(w.getDevice())) {
                    Sparse24 s = Sparse24.of(st.load(tmp, join(path, "sparse24_values")),
                            st.load(tmp, join(path, "sparse24_indices")), w.getShape());
                    NDArray dense = s.decompress(tmp).toType(w.getDataType(), false);
                    w.set(ALL, dense); // not set(ByteBuffer): see ALL
                } catch (IllegalArgumentException ex) {
                    throw new QuantizedArtifactException("2:4 layer '" + path + "': " + ex.getMessage(), ex);
                }
            }
            for (Map.Entry<String, Parameter> p : Blocks.parameters(block).entrySet()) {
                if (manifest.sparse24().containsKey(parentOf(p.getKey())) && p.getKey().endsWith(".weight")) {
                    continue;
                }
                NDArray target = p.getValue().getArray();
                try (NDManager tmp = target.getManager().newSubManager(target.getDevice())) {
                    NDArray v = st.load(tmp, p.getKey(), target.getDataType());
                    target.set(ALL, v);
                }
            }
        }
    }

    /**
     * Every element, for copying loaded values into a parameter in place. {@code NDArray.set(ByteBuffer)} would do
     * too, but DJL's native {@code torchSet} opens libtorch's deprecated {@code AutoNonVariableTypeMode}, which prints
     * a 480-character warning on the first load of every process; an indexed copy runs {@code index_put_} instead.
     */
    private static final NDIndex ALL = new NDIndex(":");

    /** The quantized arrays of {@code path} ({@code (out, in)} weight or {@code (vocab, hidden)} table). */
    private static void expectQuantized(HfCheckpoint st, String path, QuantScheme scheme, int groupSize, Shape shape,
            String where) throws QuantizedArtifactException {
        long out = shape.get(0);
        long in = shape.get(1);
        if (scheme == QuantScheme.INT8_WEIGHT_ONLY) {
            expect(st, join(path, "qweight"), SafetensorsDType.I8, new Shape(out, in));
            expect(st, join(path, "scales"), SafetensorsDType.F32, new Shape(out, 1));
        } else {
            if (in % groupSize != 0 || in % 2 != 0) {
                throw new QuantizedArtifactException(where + ": group_size " + groupSize + " does not divide "
                        + in + " (or it is odd)");
            }
            long groups = in / groupSize;
            expect(st, join(path, "qweight"), SafetensorsDType.U8, new Shape(out, in / 2));
            expect(st, join(path, "scales"), SafetensorsDType.F32, new Shape(out, groups));
            expect(st, join(path, "zeros"), SafetensorsDType.U8, new Shape(out, groups));
        }
    }

    private static Parameter embeddingAt(Block block, String path) throws QuantizedArtifactException {
        Block b;
        try {
            b = Blocks.get(block, path);
        } catch (IllegalArgumentException e) {
            throw new QuantizedArtifactException("embedding '" + path + "' is not in the block: " + e.getMessage(), e);
        }
        Parameter table = QuantizedEmbedding.tableParameter(b);
        if (table == null) {
            throw new QuantizedArtifactException("embedding '" + path + "': the block has a "
                    + b.getClass().getSimpleName() + " there, not an embedding table (TokenEmbedding or DJL"
                    + " Embedding)");
        }
        return table;
    }

    private static Linear linearAt(Block block, String path, String what) throws QuantizedArtifactException {
        Block b;
        try {
            b = Blocks.get(block, path);
        } catch (IllegalArgumentException e) {
            throw new QuantizedArtifactException(what + " '" + path + "' is not in the block: " + e.getMessage(), e);
        }
        if (!(b instanceof Linear)) {
            throw new QuantizedArtifactException(what + " '" + path + "': the block has a "
                    + b.getClass().getSimpleName() + " there, not a Linear");
        }
        return (Linear) b;
    }

    private static void expect(HfCheckpoint st, String name, SafetensorsDType dtype, Shape shape)
            throws QuantizedArtifactException {
        TensorInfo info = info(st, name);
        if (info.dtype() != dtype || !info.djlShape().equals(shape)) {
            throw new QuantizedArtifactException("tensor '" + name + "': expected " + dtype + " " + shape + ", got "
                    + info.dtype() + " " + info.djlShape());
        }
    }

    private static void expectFloat(HfCheckpoint st, String name, Shape shape) throws QuantizedArtifactException {
        TensorInfo info = info(st, name);
        if (!info.dtype().isFloating() || !info.djlShape().equals(shape)) {
            throw new QuantizedArtifactException("tensor '" + name + "': expected a floating tensor " + shape
                    + ", got " + info.dtype() + " " + info.djlShape());
        }
    }

    private static void expectFloatOrSame(HfCheckpoint st, String name, Parameter param)
            throws QuantizedArtifactException {
        TensorInfo info = info(st, name);
        DataType type = param.getArray().getDataType();
        boolean typeOk = type.isFloating() ? info.dtype().isFloating() : info.dtype().loadedAs() == type;
        if (!typeOk || !info.djlShape().equals(param.getShape())) {
            throw new QuantizedArtifactException("tensor '" + name + "': the block expects " + type + " "
                    + param.getShape() + ", the artifact has " + info.dtype() + " " + info.djlShape());
        }
    }

    private static TensorInfo info(HfCheckpoint st, String name) throws QuantizedArtifactException {
        if (!st.contains(name)) {
            throw new QuantizedArtifactException(st.directory() + ": tensor '" + name + "' is missing");
        }
        return st.info(name);
    }

    private static ArtifactManifest parse(Path dir, JsonObject meta) throws QuantizedArtifactException {
        String where = dir.resolve(METADATA).toString();
        String format = string(meta, "format", where);
        if (!FORMAT.equals(format)) {
            throw new QuantizedArtifactException(where + ": format is '" + format + "', expected '" + FORMAT + "'");
        }
        int version = integer(meta, "format_version", where);
        if (version < MIN_FORMAT_VERSION || version > FORMAT_VERSION) {
            throw new QuantizedArtifactException(where + ": unsupported format_version " + version
                    + " (this library reads versions " + MIN_FORMAT_VERSION + " to " + FORMAT_VERSION + ")");
        }
        Map<String, ArtifactManifest.LayerEntry> layers = new LinkedHashMap<>();
        for (Map.Entry<String, JsonElement> e : object(meta, "layers", where).entrySet()) {
            String lw = where + " layer '" + e.getKey() + "'";
            if (!e.getValue().isJsonObject()) {
                throw new QuantizedArtifactException(lw + ": not an object");
            }
            JsonObject l = e.getValue().getAsJsonObject();
            QuantScheme scheme;
            String schemeId = string(l, "scheme", lw);
            try {
                scheme = QuantScheme.fromId(schemeId);
            } catch (IllegalArgumentException ex) {
                throw new QuantizedArtifactException(lw + ": " + ex.getMessage(), ex);
            }
            Shape shape = shape(l, lw);
            int group = integer(l, "group_size", lw);
            if (group <= 0 || (scheme == QuantScheme.INT8_WEIGHT_ONLY && group != shape.get(1))) {
                throw new QuantizedArtifactException(lw + ": bad group_size " + group);
            }
            String method = string(l, "method", lw);
            QuantMethod quantMethod;
            try {
                quantMethod = QuantMethod.fromId(method);
            } catch (IllegalArgumentException ex) {
                throw new QuantizedArtifactException(lw + ": " + ex.getMessage(), ex);
            }
            String dtype = string(l, "weight_dtype", lw);
            if (!dtype.equals("float32") && !dtype.equals("float16")) {
                throw new QuantizedArtifactException(lw + ": weight_dtype must be float32 or float16, got " + dtype);
            }
            layers.put(e.getKey(), new ArtifactManifest.LayerEntry(scheme, group, method, shape, dtype,
                    bool(l, "input_scales", lw), bool(l, "bias", lw)));
        }
        Map<String, Shape> sparse = new LinkedHashMap<>();
        if (meta.has("sparse24")) {
            for (Map.Entry<String, JsonElement> e : object(meta, "sparse24", where).entrySet()) {
                String lw = where + " sparse24 '" + e.getKey() + "'";
                Shape s = shape(e.getValue().getAsJsonObject(), lw);
                if (s.get(1) % 8 != 0) {
                    throw new QuantizedArtifactException(lw + ": input dimension must be a multiple of 8, got " + s);
                }
                sparse.put(e.getKey(), s);
            }
        }
        Map<String, ArtifactManifest.EmbeddingEntry> embeddings = new LinkedHashMap<>();
        if (meta.has("embeddings")) {
            if (version < EMBEDDINGS_VERSION) {
                throw new QuantizedArtifactException(where + ": 'embeddings' needs format_version "
                        + EMBEDDINGS_VERSION + " or later, the file says " + version);
            }
            for (Map.Entry<String, JsonElement> e : object(meta, "embeddings", where).entrySet()) {
                String lw = where + " embedding '" + e.getKey() + "'";
                if (!e.getValue().isJsonObject()) {
                    throw new QuantizedArtifactException(lw + ": not an object");
                }
                JsonObject l = e.getValue().getAsJsonObject();
                QuantScheme scheme;
                try {
                    scheme = QuantScheme.fromId(string(l, "scheme", lw));
                } catch (IllegalArgumentException ex) {
                    throw new QuantizedArtifactException(lw + ": " + ex.getMessage(), ex);
                }
                Shape shape = shape(l, lw);
                int group = integer(l, "group_size", lw);
                boolean groupOk = scheme == QuantScheme.INT8_WEIGHT_ONLY ? group == shape.get(1)
                        : (group == 32 || group == 64 || group == 128) && shape.get(1) % group == 0;
                if (!groupOk) {
                    throw new QuantizedArtifactException(lw + ": bad group_size " + group + " for " + scheme.id()
                            + " and hidden size " + shape.get(1));
                }
                String dtype = string(l, "weight_dtype", lw);
                if (!dtype.equals("float32") && !dtype.equals("float16")) {
                    throw new QuantizedArtifactException(lw + ": weight_dtype must be float32 or float16, got "
                            + dtype);
                }
                String parameter = string(l, "parameter", lw);
                if (parameter.isEmpty() || parameter.contains(".")) {
                    throw new QuantizedArtifactException(lw + ": parameter must be a plain name, got '" + parameter
                            + "'");
                }
                if (layers.containsKey(e.getKey())) {
                    throw new QuantizedArtifactException(lw + ": also listed under 'layers'");
                }
                embeddings.put(e.getKey(), new ArtifactManifest.EmbeddingEntry(scheme, group, shape, dtype, parameter));
            }
        }
        Map<String, String> files = strings(object(meta, "files", where), where + " files");
        Map<String, String> sources =
                meta.has("source_files") ? strings(object(meta, "source_files", where), where) : Map.of();
        return new ArtifactManifest(version, string(meta, "library_version", where), string(meta, "architecture", where),
                layers, sparse, embeddings, files, sources);
    }

    private static JsonElement field(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = o.get(name);
        if (e == null || e.isJsonNull()) {
            throw new QuantizedArtifactException(where + ": missing field '" + name + "'");
        }
        return e;
    }

    private static String string(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = field(o, name, where);
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isString()) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be a string, got " + e);
        }
        return e.getAsString();
    }

    private static int integer(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = field(o, name, where);
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isNumber()) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be an integer, got " + e);
        }
        double d = e.getAsDouble();
        if (d != Math.rint(d) || Math.abs(d) > Integer.MAX_VALUE) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be an integer, got " + e);
        }
        return (int) d;
    }

    private static boolean bool(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = field(o, name, where);
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isBoolean()) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be true or false, got " + e);
        }
        return e.getAsBoolean();
    }

    private static JsonObject object(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = field(o, name, where);
        if (!e.isJsonObject()) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be an object");
        }
        return e.getAsJsonObject();
    }

    private static Map<String, String> strings(JsonObject o, String where) throws QuantizedArtifactException {
        Map<String, String> out = new LinkedHashMap<>();
        for (Map.Entry<String, JsonElement> e : o.entrySet()) {
            out.put(e.getKey(), string(o, e.getKey(), where));
        }
        return out;
    }

    private static Shape shape(JsonObject l, String where) throws QuantizedArtifactException {
        JsonElement e = field(l, "shape", where);
        if (!e.isJsonArray() || e.getAsJsonArray().size() != 2) {
            throw new QuantizedArtifactException(where + ": shape must be [out, in], got " + e);
        }
        long[] dims = new long[2];
        for (int i = 0; i < 2; i++) {
            JsonElement d = e.getAsJsonArray().get(i);
            if (!d.isJsonPrimitive() || !d.getAsJsonPrimitive().isNumber() || d.getAsLong() <= 0) {
                throw new QuantizedArtifactException(where + ": shape must be positive integers, got " + e);
            }
            dims[i] = d.getAsLong();
        }
        return new Shape(dims);
    }

    private static JsonArray shapeJson(Shape s) {
        JsonArray a = new JsonArray();
        for (long d : s.getShape()) {
            a.add(d);
        }
        return a;
    }

    private static String dtypeName(DataType t) {
        return t.name().toLowerCase(Locale.ROOT);
    }

    private static String join(String path, String name) {
        return path.isEmpty() ? name : path + "." + name;
    }

    private static String parentOf(String name) {
        int dot = name.lastIndexOf('.');
        return dot < 0 ? "" : name.substring(0, dot);
    }

    private static String abbreviate(Set<String> names) {
        List<String> l = new ArrayList<>(names);
        return l.size() <= 8 ? l.toString() : l.subList(0, 8) + " and " + (l.size() - 8) + " more";
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


}
