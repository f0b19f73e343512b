package ai.djl.memopt.quantize;

import com.google.common.base.Preconditions;

/**
 * An immutable magnitude-pruning recipe for {@link Pruner#prune}: unstructured to a target sparsity (per layer, or
 * global over all selected layers), or 2:4 semi-structured (in every group of 4 consecutive input weights, keep the 2
 * largest magnitudes). Layers are chosen by a {@link LayerFilter} (default {@link LayerFilter#defaults()}).
 *
 * <pre>{@code
 * Pruner.prune(model, PruningConfig.twoFour());
 * Pruner.prune(model, PruningConfig.unstructured(0.5).withGlobal(true));
 * }</pre>
 *
 * @param pattern the pattern
 * @param sparsity target sparsity (0.5 for 2:4)
 * @param global whether unstructured ranking is global
 * @param filter which Linear layers to prune
 */
public record PruningConfig(Pattern pattern, double sparsity, boolean global, LayerFilter filter) {

    /** The sparsity pattern. */
    public enum Pattern {
        /** Any weights, the smallest magnitudes first. */
        UNSTRUCTURED,
        /** 2 of every 4 consecutive input weights. */
        SEMI_STRUCTURED_2_4
    }

    /**
     * Checks the combination ({@link #unstructured}, {@link #twoFour} and {@link #parse} are the usual ways in).
     *
     * @throws IllegalArgumentException naming the bad value
     */
    public PruningConfig {
        Preconditions.checkNotNull(pattern, "pattern");
        Preconditions.checkNotNull(filter, "filter");
        if (pattern == Pattern.UNSTRUCTURED) {
            Preconditions.checkArgument(sparsity >= 0 && sparsity < 1, "sparsity must be in [0, 1), got %s", sparsity);
        } else {
            Preconditions.checkArgument(sparsity == 0.5, "2:4 sparsity is 0.5, got %s", sparsity);
            Preconditions.checkArgument(!global, "2:4 pruning is always per group");
        }
    }

    /**
     * Unstructured, per layer: exactly {@code round(sparsity * numel)} weights of every layer become zero.
     *
     * @param sparsity in [0, 1)
     */
    public static PruningConfig unstructured(double sparsity) {
        return new PruningConfig(Pattern.UNSTRUCTURED, sparsity, false, LayerFilter.defaults());
    }

    /** 2:4 semi-structured (50% sparsity, every layer). */
    public static PruningConfig twoFour() {
        return new PruningConfig(Pattern.SEMI_STRUCTURED_2_4, 0.5, false, LayerFilter.defaults());
    }

    /**
     * Parses {@code "2:4"} or a sparsity such as {@code "0.5"} (the CLI's {@code --prune}).
     *
     * @throws IllegalArgumentException naming the bad value
     */
    public static PruningConfig parse(String spec) {
        if ("2:4".equals(spec.trim())) {
            return twoFour();
        }
        double s;
        try {
            s = Double.parseDouble(spec.trim());
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException("--prune must be '2:4' or a sparsity in [0, 1), got '" + spec + "'");
        }
        return unstructured(s);
    }

    /** Unstructured only: rank magnitudes over all selected layers together instead of per layer. */
    public PruningConfig withGlobal(boolean global) {
        return new PruningConfig(pattern, sparsity, global, filter);
    }

    /** Which Linear layers to prune. */
    public PruningConfig withFilter(LayerFilter filter) {
        return new PruningConfig(pattern, sparsity, global, filter);
    }

    @Override
    public String toString() {
        return pattern == Pattern.SEMI_STRUCTURED_2_4 ? "2:4" : "unstructured " + sparsity + (global ? " global" : "");
    }
}
