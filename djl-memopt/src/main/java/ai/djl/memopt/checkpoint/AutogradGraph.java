package ai.djl.memopt.checkpoint;

import ai.djl.engine.EngineException;
import ai.djl.ndarray.NDArray;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.Arrays;
import java.util.List;

/**
 * The questions about, and operations on, PyTorch's autograd graph that {@link CheckpointingGradientCollector} needs
 * and DJL's {@code NDArray} does not offer: whether a non-leaf array carries a graph, a second handle on an array in
 * the same graph, a vector-Jacobian product, and whether blocks have a parameter that requires grad.
 */
final class AutogradGraph {

    private AutogradGraph() {}

    /**
     * Whether {@code x}, which is not a leaf requiring grad, was computed from something that requires grad. DJL cannot
     * ask this directly: {@code hasGradient()} (torch's {@code requires_grad()} through DJL's JNI) answers false for
     * every non-leaf, and {@code JniUtils.getGradientFunctionNames} crashes the JVM on a tensor without a
     * {@code grad_fn}. A view taken with grad mode on is a non-leaf exactly when its base has a graph or requires grad,
     * and torch refuses {@code requires_grad_(false)} on a non-leaf, so the refusal on a throwaway view answers it.
     */
    static boolean carriesGraph(NDArray x) {
        try (NDArray view = alias(x)) {
            view.setRequiresGradient(false);
            return false;
        } catch (EngineException e) {
            if (e.getMessage() != null && e.getMessage().contains("leaf variables")) {
                return true;
            }
            throw e;
        }
    }

    /** A new handle on the same data, connected to {@code x}'s autograd graph (a full-slice view). */
    static NDArray alias(NDArray x) {
        long[] shape = x.getShape().getShape();
        long[] min = new long[shape.length];
        long[] step = new long[shape.length];
        Arrays.fill(step, 1);
        PtNDArray px = (PtNDArray) x;
        return JniUtils.index(px, min, shape, step, px.getManager());
    }

    /** output.backward(upstream): accumulates upstream^T d(output)/d(everything requiring grad). */
    static void vjp(NDArray output, NDArray upstream, boolean keepGraph) {
        try {
            JniUtils.backward((PtNDArray) output, (PtNDArray) upstream, keepGraph, false);
        } catch (EngineException e) {
            // an output that depends on nothing trainable (frozen block, input without grad) has no graph to follow;
            // NDArray.hasGradient() cannot tell beforehand for non-leaf arrays
            if (e.getMessage() == null || !e.getMessage().contains("does not require grad")) {
                throw e;
            }
        }
    }

    static boolean anyParameterRequiresGrad(List<Block> blocks) {
        for (Block b : blocks) {
            for (Parameter p : b.getParameters().values()) {
                if (p.requiresGradient()) {
                    return true;
                }
            }
        }
        return false;
    }
}
