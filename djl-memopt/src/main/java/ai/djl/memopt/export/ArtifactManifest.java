package ai.djl.memopt.export;

import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.ndarray.types.Shape;
import com.google.common.collect.ImmutableMap;
import java.util.Map;

/** The parsed, verified {@code quantization.json} of a {@link QuantizedArtifact}. */
public final class ArtifactManifest {

    /** One quantized layer's entry. */
    public static final class LayerEntry {
        private final QuantScheme scheme;
        private final int groupSize;
        private final String method;
        private final Shape shape;
        private final String weightDtype;
        private final boolean inputScales;
        private final boolean bias;

        LayerEntry(QuantScheme scheme, int groupSize, String method, Shape shape, String weightDtype, boolean inputScales,
                boolean bias) {
            this.scheme = scheme;
            this.groupSize = groupSize;
            this.method = method;
            this.shape = shape;
            this.weightDtype = weightDtype;
            this.inputScales = inputScales;
            this.bias = bias;
        }

        /** Scheme. */
        public QuantScheme scheme() {
            return scheme;
        }

        /** Input weights per scale. */
        public int groupSize() {
            return groupSize;
        }

        /** {@code rtn}, {@code awq} or {@code gptq}. */
        public String method() {
            return method;
        }

        /** Original weight shape (out, in). */
        public Shape shape() {
            return shape;
        }

        /** Original weight type ({@code float32}/{@code float16}). */
        public String weightDtype() {
            return weightDtype;
        }

        /** Whether AWQ input-channel scales are stored ({@code <path>.input_scales}). */
        public boolean inputScales() {
            return inputScales;
        }

        /** Whether a bias is stored. */
        public boolean bias() {
            return bias;
        }
    }

    /** One quantized embedding table's entry (format version 2). */
    public static final class EmbeddingEntry {
        private final QuantScheme scheme;
        private final int groupSize;
        private final Shape shape;
        private final String weightDtype;
        private final String parameter;

        EmbeddingEntry(QuantScheme scheme, int groupSize, Shape shape, String weightDtype, String parameter) {
            this.scheme = scheme;
            this.groupSize = groupSize;
            this.shape = shape;
            this.weightDtype = weightDtype;
            this.parameter = parameter;
        }

        /** Scheme. */
        public QuantScheme scheme() {
            return scheme;
        }

        /** Hidden values per scale: {@code hidden} for int8 (one scale per row), 32/64/128 for int4. */
        public int groupSize() {
            return groupSize;
        }

        /** Table shape (vocab, hidden). */
        public Shape shape() {
            return shape;
        }

        /** Original table type ({@code float32}/{@code float16}). */
        public String weightDtype() {
            return weightDtype;
        }

        /** The table parameter's name in the block ({@code weight}, or {@code embedding} for DJL's Embedding). */
        public String parameter() {
            return parameter;
        }
    }

    private final int formatVersion;
    private final String libraryVersion;
    private final String architecture;
    private final Map<String, LayerEntry> layers;
    private final Map<String, Shape> sparse24;
    private final Map<String, EmbeddingEntry> embeddings;
    private final Map<String, String> files;
    private final Map<String, String> sourceFiles;

    ArtifactManifest(int formatVersion, String libraryVersion, String architecture, Map<String, LayerEntry> layers,
            Map<String, Shape> sparse24, Map<String, EmbeddingEntry> embeddings, Map<String, String> files,
            Map<String, String> sourceFiles) {
        this.formatVersion = formatVersion;
        this.libraryVersion = libraryVersion;
        this.architecture = architecture;
        this.layers = ImmutableMap.copyOf(layers);
        this.sparse24 = ImmutableMap.copyOf(sparse24);
        this.embeddings = ImmutableMap.copyOf(embeddings);
        this.files = ImmutableMap.copyOf(files);
        this.sourceFiles = ImmutableMap.copyOf(sourceFiles);
    }

    /** Format version. */
    public int formatVersion() {
        return formatVersion;
    }

    /** The djl-memopt version that wrote it. */
    public String libraryVersion() {
        return libraryVersion;
    }

    /** Architecture name. */
    public String architecture() {
        return architecture;
    }

    /** Quantized layers by block path. */
    public Map<String, LayerEntry> layers() {
        return layers;
    }

    /** Compactly stored 2:4 layers by block path, with their dense shape. */
    public Map<String, Shape> sparse24() {
        return sparse24;
    }

    /** Quantized embedding tables by block path (empty before format version 2). */
    public Map<String, EmbeddingEntry> embeddings() {
        return embeddings;
    }

    /** sha256 of every artifact file (except quantization.json itself). */
    public Map<String, String> files() {
        return files;
    }

    /**
     * What the artifact holds, in a few words: its layers' schemes in order of first appearance ({@code int4 g128},
     * {@code int8}; an int4 scheme with the group size most of its layers use, as layers narrower than the group get
     * smaller groups), then quantized embeddings and compact 2:4 layers if any.
     */
    public String summary() {
        java.util.Map<QuantScheme, java.util.Map<Integer, Integer>> groups = new java.util.LinkedHashMap<>();
        for (LayerEntry l : layers.values()) {
            groups.computeIfAbsent(l.scheme(), k -> new java.util.HashMap<>()).merge(l.groupSize(), 1, Integer::sum);
        }
        java.util.List<String> parts = new java.util.ArrayList<>();
        groups.forEach((scheme, bySize) -> parts.add(scheme != QuantScheme.INT4_WEIGHT_ONLY ? scheme.id()
                : "int4 g" + java.util.Collections.max(bySize.entrySet(), java.util.Map.Entry.comparingByValue())
                        .getKey()));
        if (!embeddings.isEmpty()) {
            parts.add(embeddings.values().iterator().next().scheme().id() + " embeddings");
        }
        if (!sparse24.isEmpty()) {
            parts.add("2:4 sparse");
        }
        return parts.isEmpty() ? "no quantized layer" : String.join(", ", parts);
    }

    /** sha256 of the source checkpoint files, by file name. */
    public Map<String, String> sourceFiles() {
        return sourceFiles;
    }
}
