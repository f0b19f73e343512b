package ai.djl.memopt.export;

import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.ndarray.types.Shape;
import com.google.common.collect.ImmutableMap;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The parsed, verified {@code quantization.json} of a {@link QuantizedArtifact}.
 *
 * @param formatVersion format version
 * @param libraryVersion the djl-memopt version that wrote it
 * @param architecture architecture name
 * @param layers quantized layers by block path
 * @param sparse24 compactly stored 2:4 layers by block path, with their dense shape
 * @param embeddings quantized embedding tables by block path (empty before format version 2)
 * @param files sha256 of every artifact file (except quantization.json itself)
 * @param sourceFiles sha256 of the source checkpoint files, by file name
 */
public record ArtifactManifest(int formatVersion, String libraryVersion, String architecture,
        Map<String, LayerEntry> layers, Map<String, Shape> sparse24, Map<String, EmbeddingEntry> embeddings,
        Map<String, String> files, Map<String, String> sourceFiles) {

    /**
     * One quantized layer's entry.
     *
     * @param scheme scheme
     * @param groupSize input weights per scale
     * @param method {@code rtn}, {@code awq} or {@code gptq}
     * @param shape original weight shape (out, in)
     * @param weightDtype original weight type ({@code float32}/{@code float16})
     * @param inputScales whether AWQ input-channel scales are stored ({@code <path>.input_scales})
     * @param bias whether a bias is stored
     */
    public record LayerEntry(QuantScheme scheme, int groupSize, String method, Shape shape, String weightDtype,
            boolean inputScales, boolean bias) {}

    /**
     * One quantized embedding table's entry (format version 2).
     *
     * @param scheme scheme
     * @param groupSize hidden values per scale: {@code hidden} for int8 (one scale per row), 32/64/128 for int4
     * @param shape table shape (vocab, hidden)
     * @param weightDtype original table type ({@code float32}/{@code float16})
     * @param parameter the table parameter's name in the block ({@code weight}, or {@code embedding} for DJL's
     *     Embedding)
     */
    public record EmbeddingEntry(QuantScheme scheme, int groupSize, Shape shape, String weightDtype,
            String parameter) {}

    /** Copies the maps into immutable ones. */
    public ArtifactManifest {
        layers = ImmutableMap.copyOf(layers);
        sparse24 = ImmutableMap.copyOf(sparse24);
        embeddings = ImmutableMap.copyOf(embeddings);
        files = ImmutableMap.copyOf(files);
        sourceFiles = ImmutableMap.copyOf(sourceFiles);
    }

    /**
     * What the artifact holds, in a few words: its layers' schemes in order of first appearance ({@code int4 g128},
     * {@code int8}; an int4 scheme with the group size most of its layers use, as layers narrower than the group get
     * smaller groups), then quantized embeddings and compact 2:4 layers if any.
     */
    public String summary() {
        Map<QuantScheme, Map<Integer, Integer>> groups = new LinkedHashMap<>();
        for (LayerEntry l : layers.values()) {
            groups.computeIfAbsent(l.scheme(), k -> new HashMap<>()).merge(l.groupSize(), 1, Integer::sum);
        }
        List<String> parts = new ArrayList<>();
        groups.forEach((scheme, bySize) -> parts.add(scheme != QuantScheme.INT4_WEIGHT_ONLY ? scheme.id()
                : "int4 g" + Collections.max(bySize.entrySet(), Map.Entry.comparingByValue()).getKey()));
        if (!embeddings.isEmpty()) {
            parts.add(embeddings.values().iterator().next().scheme().id() + " embeddings");
        }
        if (!sparse24.isEmpty()) {
            parts.add("2:4 sparse");
        }
        return parts.isEmpty() ? "no quantized layer" : String.join(", ", parts);
    }
}
