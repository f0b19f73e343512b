package ai.djl.memopt.checkpoint;

import ai.djl.ndarray.NDArray;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.ArrayList;
import java.util.Collections;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Set;

/**
 * The gradients of leaves (segment outputs and leaves the caller registered) as they were before a segment's backward,
 * put back when the segment is retried ({@link SegmentListener}): a leaf that had none gets a zeroed buffer (the same
 * for what accumulates into it later), one that had a gradient gets a copy of it back. Copies are made only for leaves
 * that already held a gradient; in a chain of layers (each output read by the next layer only) there are none.
 */
final class LeafGuard implements AutoCloseable {

    private final List<NDArray> leaves;
    private final List<NDArray> saved;

    private LeafGuard(List<NDArray> leaves, List<NDArray> saved) {
        this.leaves = leaves;
        this.saved = saved;
    }

    /** Distinct leaves that require grad, in order (identity). */
    static List<NDArray> distinct(Iterable<NDArray> leaves) {
        Set<NDArray> seen = Collections.newSetFromMap(new IdentityHashMap<>());
        List<NDArray> out = new ArrayList<>();
        for (NDArray a : leaves) {
            if (a != null && !a.isReleased() && a.hasGradient() && seen.add(a)) {
                out.add(a);
            }
        }
        return out;
    }

    /** Records the gradients of {@code leaves} now (copies of those that exist). */
    static LeafGuard before(List<NDArray> leaves) {
        List<NDArray> saved = new ArrayList<>(leaves.size());
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(false);
        try {
            for (NDArray leaf : leaves) {
                NDArray g = JniUtils.getGradient((PtNDArray) leaf);
                if (g == null) {
                    saved.add(null);
                    continue;
                }
                try (g) {
                    saved.add(g.duplicate());
                }
            }
        } finally {
            JniUtils.setGradMode(gradMode);
        }
        return new LeafGuard(leaves, saved);
    }

    /** The gradients that exist of {@code leaves}: new handles the caller closes. */
    static List<NDArray> gradients(List<NDArray> leaves) {
        List<NDArray> out = new ArrayList<>();
        for (NDArray leaf : leaves) {
            NDArray g = JniUtils.getGradient((PtNDArray) leaf);
            if (g != null) {
                out.add(g);
            }
        }
        return out;
    }

    /** The guarded leaves. */
    List<NDArray> leaves() {
        return leaves;
    }

    /** Puts the recorded gradients back (zeroes those that had none; a fill, so infinities and NaN go too). */
    void restore() {
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(false);
        try {
            for (int i = 0; i < leaves.size(); i++) {
                NDArray leaf = leaves.get(i);
                NDArray g = JniUtils.getGradient((PtNDArray) leaf);
                if (g == null) {
                    continue;
                }
                try (g) {
                    JniUtils.zeroGrad((PtNDArray) leaf);
                    if (saved.get(i) != null) {
                        g.addi(saved.get(i));
                    }
                }
            }
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }

    @Override
    public void close() {
        for (NDArray s : saved) {
            if (s != null) {
                s.close();
            }
        }
    }
}
