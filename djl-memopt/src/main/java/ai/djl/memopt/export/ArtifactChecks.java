package ai.djl.memopt.export;

import static ai.djl.memopt.export.QuantizedArtifact.join;
import static ai.djl.memopt.export.QuantizedArtifact.parentOf;

import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.NameLists;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import java.io.IOException;
import java.nio.file.Path;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;

/**
 * The checks {@link ArtifactLoader} makes before it changes a block: every entry of the manifest has a place of the
 * right kind and shape in the block, every tensor it needs exists with the dtype and shape the format says, no tensor
 * is left over, quantized values are in their ranges ({@link ArtifactRanges}) and float values are finite.
 */
final class ArtifactChecks {

    private ArtifactChecks() {}

    /** Checks {@code st} (the artifact's weights) against {@code block}; throws naming the entry or tensor at fault. */
    static void check(Path dir, HfCheckpoint st, Block block, ArtifactManifest manifest) throws IOException {
        Map<String, Parameter> params = BlockTrees.parameters(block);
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
                    + NameLists.abbreviate(unexpected) + " (artifact of a different architecture?)");
        }
        // the values too, before the block changes: quantized ones in their ranges, float ones finite
        ArtifactRanges.check(st, manifest);
        for (String name : st.names()) {
            if (st.info(name).dtype().isFloating()) {
                st.checkFinite(name);
            }
        }
    }

    /** The quantized arrays of {@code path} ({@code (out, in)} weight or {@code (vocab, hidden)} table). */
    static void expectQuantized(HfCheckpoint st, String path, QuantScheme scheme, int groupSize, Shape shape,
            String where) throws QuantizedArtifactException {
        long out = shape.get(0);
        long in = shape.get(1);
        if (scheme == QuantScheme.INT8_WEIGHT_ONLY) {
            expect(st, join(path, "qweight"), SafetensorsDType.I8, new Shape(out, in));
            expect(st, join(path, "scales"), SafetensorsDType.F32, new Shape(out, in / Math.max(1, groupSize)));
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

    static Parameter embeddingAt(Block block, String path) throws QuantizedArtifactException {
        Block b;
        try {
            b = BlockTrees.get(block, path);
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

    static Linear linearAt(Block block, String path, String what) throws QuantizedArtifactException {
        Block b;
        try {
            b = BlockTrees.get(block, path);
        } catch (IllegalArgumentException e) {
            throw new QuantizedArtifactException(what + " '" + path + "' is not in the block: " + e.getMessage(), e);
        }
        if (!(b instanceof Linear)) {
            throw new QuantizedArtifactException(what + " '" + path + "': the block has a "
                    + b.getClass().getSimpleName() + " there, not a Linear");
        }
        return (Linear) b;
    }

    static void expect(HfCheckpoint st, String name, SafetensorsDType dtype, Shape shape)
            throws QuantizedArtifactException {
        TensorInfo info = info(st, name);
        if (info.dtype() != dtype || !info.djlShape().equals(shape)) {
            throw new QuantizedArtifactException("tensor '" + name + "': expected " + dtype + " " + shape + ", got "
                    + info.dtype() + " " + info.djlShape());
        }
    }

    static void expectFloat(HfCheckpoint st, String name, Shape shape) throws QuantizedArtifactException {
        TensorInfo info = info(st, name);
        if (!info.dtype().isFloating() || !info.djlShape().equals(shape)) {
            throw new QuantizedArtifactException("tensor '" + name + "': expected a floating tensor " + shape
                    + ", got " + info.dtype() + " " + info.djlShape());
        }
    }

    static void expectFloatOrSame(HfCheckpoint st, String name, Parameter param)
            throws QuantizedArtifactException {
        TensorInfo info = info(st, name);
        DataType type = param.getArray().getDataType();
        boolean typeOk = type.isFloating() ? info.dtype().isFloating() : info.dtype().loadedAs() == type;
        if (!typeOk || !info.djlShape().equals(param.getShape())) {
            throw new QuantizedArtifactException("tensor '" + name + "': the block expects " + type + " "
                    + param.getShape() + ", the artifact has " + info.dtype() + " " + info.djlShape());
        }
    }

    static TensorInfo info(HfCheckpoint st, String name) throws QuantizedArtifactException {
        if (!st.contains(name)) {
            throw new QuantizedArtifactException(st.directory() + ": tensor '" + name + "' is missing");
        }
        return st.info(name);
    }
}
