package ai.djl.memopt.checkpoint;

import ai.djl.ndarray.NDArray;
import ai.djl.nn.Block;
import com.google.common.base.Preconditions;
import java.util.List;

/**
 * Told by {@link CheckpointingGradientCollector#setSegmentListener} when gradients are complete during a backward, and
 * able to have an outermost segment back-propagated again with its upstream gradients multiplied by a factor (a
 * retry). The collector knows nothing of loss scales: a caller that finds a segment's gradients unusable (an FP16
 * overflow) asks for a retry with a smaller factor, after dropping the gradients of its own parameters that the
 * failed attempt reached. The collector restores the gradients of the leaves it knows (see {@link Event#leafGradients})
 * to what they were before the attempt and runs the segment's recomputation and backward again.
 *
 * <pre>{@code
 * gc.setSegmentListener(e -> finite(e) ? SegmentListener.Verdict.CONTINUE : SegmentListener.Verdict.retry(0.5f));
 * }</pre>
 */
@FunctionalInterface
public interface SegmentListener {

    /**
     * Called once after the target's own backward ({@link Event#isHead}: what lies between the target and the last
     * segment, such as a final norm and an LM head, has its gradient then; a retry cannot be asked there), and after
     * each attempt of each outermost segment's backward, nested segments included: the gradients of the parameters
     * that only its blocks use are then final, unless a retry is asked.
     */
    Verdict segmentDone(Event event);

    /**
     * Called after the backward of each segment nested in an outermost one (at any depth; one whose outputs received
     * no gradient was not back-propagated), in every attempt of the outermost segment: the gradients of the
     * parameters that only its blocks use are complete for that attempt. No retry can be asked here, and
     * {@link Event#leafGradients} is empty; {@link Event#attempt} is the outermost segment's. The outermost segment's
     * {@link #segmentDone} still follows, and a retry it asks for back-propagates this segment again.
     */
    default void nestedSegmentDone(Event event) {
    }

    /**
     * Whether {@link #segmentDone} may ask for a retry. The collector then keeps what a retry needs: the graph behind a
     * segment's computed input until the segment is done (freed when it is, rather than while it is back-propagated),
     * and a copy of any gradient that a guarded leaf already held before the segment's backward.
     */
    default boolean mayRetry() {
        return false;
    }

    /**
     * One call of the listener.
     *
     * @param name the segment's name (its block's path), or the empty string after the target's own backward
     * @param blocks the segment's blocks (empty after the target's own backward)
     * @param attempt 0 for the first backward of the segment, then 1, 2, ... for the retries
     * @param inputHasGraph whether the segment's input was computed with autograd outside any segment: its backward may
     *     have reached parameters and leaves behind it
     * @param leafGradients the gradients (those that exist) of the leaves known to the collector that this backward may
     *     have reached: the outputs of earlier segments it reads, and, after the target's backward or where the input
     *     carries a graph, the outputs of every segment still to visit and the leaves given to
     *     {@link CheckpointingGradientCollector#markComputed(NDArray, NDArray...)}; handles the collector closes after
     *     the call
     */
    record Event(String name, List<Block> blocks, int attempt, boolean inputHasGraph, List<NDArray> leafGradients) {

        /** Whether this is the call after the target's own backward, before any segment's. */
        public boolean isHead() {
            return blocks.isEmpty();
        }
    }

    /**
     * What to do after a segment's backward: go on, or back-propagate it again with its upstream gradients multiplied by
     * {@code retryFactor} (the product over retries applies: two retries at 0.5 leave a quarter).
     */
    record Verdict(float retryFactor) {

        /** Go on to the next segment. */
        public static final Verdict CONTINUE = new Verdict(1f);

        public Verdict {
            Preconditions.checkArgument(retryFactor > 0 && retryFactor <= 1,
                    "a segment retry factor must be in (0, 1], got %s", retryFactor);
        }

        /** A retry with the upstream gradients multiplied by {@code factor}, in (0, 1). */
        public static Verdict retry(float factor) {
            Preconditions.checkArgument(factor < 1, "a segment retry needs a factor below 1, got %s", factor);
            return new Verdict(factor);
        }

        /** Whether this asks for a retry. */
        public boolean retries() {
            return retryFactor < 1;
        }
    }
}
