package ai.djl.memopt.finetune;

import ai.djl.memopt.precision.ParameterArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.Collections;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Set;

/**
 * Gradient buffers as the fused update handles them ({@link FusedUpdate}): whether one exists, whether a set of arrays
 * is finite (reduced on the device), and freeing one.
 */
final class GradientBuffers {

    /** Parameters whose array is torch-allocated (copied once by {@link #release}). */
    private final Set<Parameter> owned = Collections.newSetFromMap(new IdentityHashMap<>());

    /** Whether {@code p} has a gradient buffer. */
    static boolean exists(Parameter p) {
        NDArray g = JniUtils.getGradient((PtNDArray) p.getArray());
        if (g == null) {
            return false;
        }
        g.close();
        return true;
    }

    /**
     * A 0-dimensional boolean on the device, in {@code t}: whether some array of {@code arrays} holds an infinity or
     * NaN (from each one's maximum and minimum: both finite exactly when every element is, NaN propagating); null when
     * there is nothing to check.
     */
    static NDArray nonFinite(List<NDArray> arrays, NDManager t) {
        NDList extremes = new NDList();
        for (NDArray g : arrays) {
            extremes.addAll(GradientCheck.extremes(g, t));
        }
        return extremes.isEmpty() ? null : GradientCheck.anyNonFinite(extremes, t);
    }

    /**
     * Frees a parameter's gradient buffer: DJL cannot set {@code grad = None}, so the parameter gets a new handle (a
     * leaf that requires grad, with no gradient yet) and the old handle is closed; the next backward allocates a fresh
     * buffer. The new handle shares the storage (a detached alias) once the storage is torch's own; the first time, it
     * is a copy: an array DJL made from Java memory (weights created or loaded on the CPU) lives on a direct buffer
     * that only the old handle keeps reachable, and the garbage collector would free it under the alias.
     */
    void release(Parameter p) {
        NDArray old = p.getArray();
        NDArray fresh;
        if (owned.add(p)) {
            boolean gradMode = JniUtils.isGradMode();
            JniUtils.setGradMode(false);
            try {
                fresh = old.duplicate(); // torch-allocated storage
            } finally {
                JniUtils.setGradMode(gradMode);
            }
        } else {
            fresh = old.stopGradient();
        }
        fresh.attach(old.getManager());
        fresh.setName(old.getName());
        fresh.setRequiresGradient(true);
        ParameterArrays.swap(p, fresh);
        old.close();
    }
}
