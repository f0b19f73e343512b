package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.ArrayList;
import java.util.List;

/**
 * The finiteness checks of one {@link FusedUpdate} pass: groups of gradients checked at once (one host read each), or
 * ORed into a device flag read once at the end of the pass. Its arrays live in a manager of the pass, closed with it.
 */
final class PassFlags implements AutoCloseable {

    private final NDManager flags;
    private final FusedGroups groups;
    private NDArray bad; // 0-dimensional boolean: a non-finite gradient seen in this pass

    PassFlags(NDManager losses, FusedGroups groups) {
        this.flags = losses.newSubManager();
        this.groups = groups;
    }

    /** Whether every gradient of {@code group} and every array of {@code more} is finite: one host read. */
    boolean finiteNow(List<String> group, List<NDArray> more) {
        try (NDManager t = flags.newSubManager()) {
            NDArray groupBad = nonFinite(group, more, t);
            return groupBad == null || !groupBad.getBoolean();
        }
    }

    /** ORs "some gradient of the group is not finite" into the pass's flag, on the device (no read). */
    void check(List<String> group) {
        try (NDManager t = flags.newSubManager()) {
            NDArray groupBad = nonFinite(group, List.of(), t);
            if (groupBad == null) {
                return;
            }
            NDArray next = bad == null ? groupBad : bad.logicalOr(groupBad);
            next.attach(flags);
            if (bad != null) {
                bad.close();
            }
            bad = next;
        }
    }

    /** Whether the loss and every gradient {@link #check}ed in the pass were finite (one host read); closes. */
    boolean finishedClean(NDArray loss) {
        try (NDManager f = flags) {
            NDArray lossBad = loss.isInfinite().logicalOr(loss.isNaN());
            lossBad.attach(f);
            NDArray any = bad == null ? lossBad : bad.logicalOr(lossBad);
            any.attach(f);
            return !any.getBoolean();
        }
    }

    /** {@link GradientBuffers#nonFinite} of the gradients of {@code group} and the arrays {@code more}. */
    private NDArray nonFinite(List<String> group, List<NDArray> more, NDManager t) {
        List<NDArray> arrays = new ArrayList<>(more);
        for (String name : group) {
            NDArray g = JniUtils.getGradient((PtNDArray) groups.get(name).getArray());
            if (g != null) {
                g.attach(t);
                arrays.add(g);
            }
        }
        return GradientBuffers.nonFinite(arrays, t);
    }

    @Override
    public void close() {
        flags.close();
    }
}
