package ai.djl.memopt.quantize;

import com.google.common.collect.ImmutableList;
import com.google.common.collect.ImmutableMap;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.util.List;
import java.util.Locale;
import java.util.Map;

/**
 * What {@link Pruner#prune} did: per layer the measured sparsity (zeros / elements after pruning).
 *
 * @param pattern the pattern
 * @param targetSparsity the target sparsity
 * @param layers pruned layers in tree order
 * @param skipped linear layers left dense, path to reason
 */
public record PruningReport(PruningConfig.Pattern pattern, double targetSparsity, List<Layer> layers,
        Map<String, String> skipped) {

    /**
     * One pruned layer.
     *
     * @param path dotted block path
     * @param zeros zero weights after pruning
     * @param numel weights
     */
    public record Layer(String path, long zeros, long numel) {

        /** Achieved sparsity. */
        public double sparsity() {
            return (double) zeros / numel;
        }
    }

    /** Copies the list and map into immutable ones. */
    public PruningReport {
        layers = ImmutableList.copyOf(layers);
        skipped = ImmutableMap.copyOf(skipped);
    }

    /** The entry for {@code path}, or null. */
    public Layer layer(String path) {
        return layers.stream().filter(l -> l.path.equals(path)).findFirst().orElse(null);
    }

    /** Zeros over weights of all pruned layers. */
    public double overallSparsity() {
        long z = layers.stream().mapToLong(Layer::zeros).sum();
        long n = layers.stream().mapToLong(Layer::numel).sum();
        return n == 0 ? 0 : (double) z / n;
    }

    /** JSON form. */
    public JsonObject toJson() {
        JsonObject o = new JsonObject();
        o.addProperty("pattern", pattern == PruningConfig.Pattern.SEMI_STRUCTURED_2_4 ? "2:4" : "unstructured");
        o.addProperty("target_sparsity", targetSparsity);
        o.addProperty("overall_sparsity", overallSparsity());
        JsonArray arr = new JsonArray();
        for (Layer l : layers) {
            JsonObject j = new JsonObject();
            j.addProperty("path", l.path);
            j.addProperty("zeros", l.zeros);
            j.addProperty("numel", l.numel);
            j.addProperty("sparsity", l.sparsity());
            arr.add(j);
        }
        o.add("layers", arr);
        JsonObject s = new JsonObject();
        skipped.forEach(s::addProperty);
        o.add("skipped", s);
        return o;
    }

    @Override
    public String toString() {
        StringBuilder b = new StringBuilder();
        for (Layer l : layers) {
            b.append(String.format(Locale.ROOT, "pruned %-48s %10d/%-10d sparsity %.4f%n", l.path, l.zeros, l.numel,
                    l.sparsity()));
        }
        b.append(String.format(Locale.ROOT, "overall sparsity %.4f (target %.4f, %s)%n", overallSparsity(), targetSparsity,
                pattern));
        return b.toString();
    }
}
