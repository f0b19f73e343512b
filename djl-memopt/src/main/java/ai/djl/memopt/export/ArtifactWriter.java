package ai.djl.memopt.export;

import static ai.djl.memopt.export.QuantizedArtifact.CONFIG;
import static ai.djl.memopt.export.QuantizedArtifact.DEEPSEEK;
import static ai.djl.memopt.export.QuantizedArtifact.EMBEDDINGS_VERSION;
import static ai.djl.memopt.export.QuantizedArtifact.EMBEDDING_LAYOUT;
import static ai.djl.memopt.export.QuantizedArtifact.FORMAT;
import static ai.djl.memopt.export.QuantizedArtifact.INT4_PACKING;
import static ai.djl.memopt.export.QuantizedArtifact.INT8_LAYOUT;
import static ai.djl.memopt.export.QuantizedArtifact.LIBRARY_VERSION;
import static ai.djl.memopt.export.QuantizedArtifact.METADATA;
import static ai.djl.memopt.export.QuantizedArtifact.MIN_FORMAT_VERSION;
import static ai.djl.memopt.export.QuantizedArtifact.SPARSE24_LAYOUT;
import static ai.djl.memopt.export.QuantizedArtifact.WEIGHTS;
import static ai.djl.memopt.export.QuantizedArtifact.join;
import static ai.djl.memopt.export.QuantizedArtifact.sha256;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.memopt.quantize.Sparse24;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.CrashPoints;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import com.google.common.base.Preconditions;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Set;

/**
 * Writes a {@link QuantizedArtifact}: the weights ({@link ShardedWriter}), {@code config.json}, the companion files
 * and, last, {@code quantization.json} with the sha256 of every other file, all into a fresh directory that then
 * replaces the old one as a whole. Each step ends at a {@link CrashPoints crash point} ({@code export.shard-written},
 * {@code export.weights-written}, {@code export.config-written}, {@code export.companion-written},
 * {@code export.manifest-written}), where tests kill the JVM.
 */
final class ArtifactWriter {

    private ArtifactWriter() {}

    /**
     * {@link QuantizedArtifact#export}: the files are written into a fresh sibling of {@code dir}, which then replaces
     * {@code dir} as a whole ({@link AtomicFiles#replaceDirectory}), so a crash at any step leaves the old artifact or
     * the new one. {@link ArtifactDirectory#checkReplaceable} first finishes what an earlier crash left and refuses a
     * directory that holds anything but an artifact.
     */
    static ArtifactManifest write(Block root, Path dir, ExportOptions options) throws IOException {
        ArtifactDirectory.checkReplaceable(dir);
        JsonObject[] meta = new JsonObject[1];
        AtomicFiles.replaceDirectory(dir, fresh -> meta[0] = writeInto(root, fresh, options));
        return ManifestParser.parse(dir, meta[0]);
    }

    /** Writes every file of the artifact into the empty directory {@code dir}, the manifest last; returns it. */
    private static JsonObject writeInto(Block root, Path dir, ExportOptions options) throws IOException {
        Map<String, Block> blocks = BlockTrees.walk(root);
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
            for (Map.Entry<String, Parameter> p : BlockTrees.parameters(root).entrySet()) {
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
            CrashPoints.reach("export.weights-written");
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
            CrashPoints.reach("export.config-written");
        } else if (root instanceof DeepSeekForCausalLM) {
            AtomicFiles.write(dir.resolve(CONFIG),
                    ((DeepSeekForCausalLM) root).config().toJson().getBytes(StandardCharsets.UTF_8));
            files.addProperty(CONFIG, sha256(dir.resolve(CONFIG)));
            CrashPoints.reach("export.config-written");
        }
        for (Path companion : options.companionFiles()) {
            String name = companion.getFileName().toString();
            Preconditions.checkArgument(!name.equals(CONFIG) && !name.equals(METADATA) && !files.has(name),
                    "companion file %s would overwrite the artifact's own %s", companion, name);
            AtomicFiles.copy(companion, dir.resolve(name));
            files.addProperty(name, sha256(dir.resolve(name)));
            CrashPoints.reach("export.companion-written");
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
        CrashPoints.reach("export.manifest-written");
        return meta;
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
}
