package ai.djl.memopt.checkpoint;

import ai.djl.nn.Block;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.List;
import java.util.function.BiPredicate;

/**
 * Decides which children of a block are checkpointed, as a list of segments: each segment is a range of consecutive
 * children whose activations are dropped after the forward and recomputed during backward; only each segment's input
 * (and its output, which the next part of the model holds anyway) stays in memory.
 *
 * <ul>
 *   <li>{@link #all()}: every child is its own segment (the usual choice for transformer layers: memory = one hidden
 *       state per layer plus one layer's internals during backward; compute = one extra forward).
 *   <li>{@link #everyNth(int)}: children {@code 0, n, 2n, ...} are segments, the others keep their activations (a
 *       trade-off between memory and recompute time).
 *   <li>{@link #sqrtN()}: Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": the {@code n} children
 *       are split into {@code ceil(sqrt(n))}-long runs, each run one segment, so only about {@code sqrt(n)} boundary
 *       activations are stored. A run of several children needs a parent whose forward feeds each child's output to
 *       the next child ({@code SequentialBlock}); {@link Checkpointing#wrapChildren} checks it.
 *   <li>{@link #matching(BiPredicate)}: each child for which a user predicate on (name, block) holds.
 * </ul>
 */
@FunctionalInterface
public interface CheckpointPolicy {

    /**
     * Plans the segments for a parent's children.
     *
     * @param names the children's names as {@link ai.djl.memopt.nn.BlockTrees#childNames} gives them
     * @param children the children, same order
     * @return non-overlapping, increasing ranges of child indices; each range is one checkpoint segment
     */
    List<Range> plan(List<String> names, List<Block> children);

    /** Every child is checkpointed on its own. */
    static CheckpointPolicy all() {
        return matching((name, block) -> true);
    }

    /** Children {@code 0, n, 2n, ...} are checkpointed on their own. */
    static CheckpointPolicy everyNth(int n) {
        Preconditions.checkArgument(n >= 1, "everyNth needs n >= 1, got %s", n);
        return (names, children) -> {
            ImmutableList.Builder<Range> out = ImmutableList.builder();
            for (int i = 0; i < children.size(); i += n) {
                out.add(new Range(i, i + 1));
            }
            return out.build();
        };
    }

    /** Chen et al.'s sqrt(n) schedule: runs of {@code ceil(sqrt(n))} consecutive children, each run one segment. */
    static CheckpointPolicy sqrtN() {
        return (names, children) -> {
            int n = children.size();
            int k = Math.max(1, (int) Math.ceil(Math.sqrt(n)));
            ImmutableList.Builder<Range> out = ImmutableList.builder();
            for (int i = 0; i < n; i += k) {
                out.add(new Range(i, Math.min(n, i + k)));
            }
            return out.build();
        };
    }

    /** Each child for which {@code predicate.test(name, child)} holds is checkpointed on its own. */
    static CheckpointPolicy matching(BiPredicate<String, Block> predicate) {
        Preconditions.checkNotNull(predicate, "predicate");
        return (names, children) -> {
            ImmutableList.Builder<Range> out = ImmutableList.builder();
            for (int i = 0; i < children.size(); i++) {
                if (predicate.test(names.get(i), children.get(i))) {
                    out.add(new Range(i, i + 1));
                }
            }
            return out.build();
        };
    }

    /** A half-open range {@code [from, to)} of child indices. */
    final class Range {
        private final int from;
        private final int to;

        /**
         * @param from first child index, inclusive
         * @param to last child index, exclusive; {@code to > from}
         */
        public Range(int from, int to) {
            Preconditions.checkArgument(from >= 0 && to > from, "bad child range [%s, %s)", from, to);
            this.from = from;
            this.to = to;
        }

        public int from() {
            return from;
        }

        public int to() {
            return to;
        }

        public int size() {
            return to - from;
        }

        @Override
        public String toString() {
            return "[" + from + ", " + to + ")";
        }

        @Override
        public boolean equals(Object o) {
            return o instanceof Range && ((Range) o).from == from && ((Range) o).to == to;
        }

        @Override
        public int hashCode() {
            return from * 31 + to;
        }
    }
}
