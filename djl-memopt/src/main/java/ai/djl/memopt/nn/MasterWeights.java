package ai.djl.memopt.nn;

import ai.djl.ndarray.NDArray;
import ai.djl.nn.Parameter;

/**
 * A decorator that keeps its own, more precise copy of parameters of the blocks below it (mixed precision's FP32
 * master weights behind FP16 working copies). A pass that reads or edits weight values in place (pruning,
 * quantization) asks the {@link BlockSite} for {@link BlockSite#value the value} of a parameter, which is the master
 * where a decorator above keeps one, and reports an in-place edit through {@link BlockSite#valueChanged}, so the
 * result is the same as running the pass before the decorator was applied.
 */
public interface MasterWeights {

    /** The array holding {@code parameter}'s true value (its master), or null if this decorator keeps none for it. */
    NDArray masterOf(Parameter parameter);

    /** Called after the master of {@code parameter} was changed in place: refreshes the working copy from it. */
    void masterChanged(Parameter parameter);
}
