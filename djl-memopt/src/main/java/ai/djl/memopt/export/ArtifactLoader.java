package ai.djl.memopt.export;

import static ai.djl.memopt.export.QuantizedArtifact.CONFIG;
import static ai.djl.memopt.export.QuantizedArtifact.DEEPSEEK;
import static ai.djl.memopt.export.QuantizedArtifact.METADATA;
import static ai.djl.memopt.export.QuantizedArtifact.join;
import static ai.djl.memopt.export.QuantizedArtifact.parentOf;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.quantize.QuantMethod;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.memopt.quantize.Sparse24;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.training.initializer.Initializer;
import java.io.IOException;
import java.nio.file.Path;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;

/**
 * Loads a verified {@link QuantizedArtifact} into a block: {@link ArtifactChecks} checks every tensor against the block
 * first, then quantized layers replace its Linear layers, 2:4 layers are decompressed into them and every other
 * parameter is copied in.
 */
final class ArtifactLoader {

    /**
     * Every element, for copying loaded values into a parameter in place. {@code NDArray.set(ByteBuffer)} would do
     * too, but DJL's native {@code torchSet} opens libtorch's deprecated {@code AutoNonVariableTypeMode}, which prints
     * a 480-character warning on the first load of every process; an indexed copy runs {@code index_put_} instead.
     */
    private static final NDIndex ALL = new NDIndex(":");


    private ArtifactLoader() {}

    /** {@link QuantizedArtifact#loadDeepSeek}. */
    static DeepSeekForCausalLM loadDeepSeek(Path dir, NDManager manager, DataType dtype) throws IOException {
        ArtifactManifest manifest = ArtifactVerifier.verify(dir);
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

    /** Checks the artifact against {@code block}, then changes the block (untouched when a check fails). */
    static void load(Path dir, Block block, ArtifactManifest manifest) throws IOException {
        try (HfCheckpoint st = HfCheckpoint.open(dir)) {
            ArtifactChecks.check(dir, st, block, manifest);
            apply(st, block, manifest);
        }
    }

    private static void apply(HfCheckpoint st, Block block, ArtifactManifest manifest) throws IOException {
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
