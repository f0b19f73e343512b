package ai.djl.memopt.finetune;

import ai.djl.memopt.checkpoint.CheckpointBlock;
import ai.djl.memopt.checkpoint.SegmentListener;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.PhaseTimer;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.function.BiFunction;
import java.util.function.Consumer;

/**
 * The optimizer update fused into the backward ({@link FineTuner.Builder#optFusedUpdate}): the parameters that only one
 * checkpointed segment (a decoder layer) uses are updated as soon as that segment's backward is done, the final norm
 * and a plain {@code lm_head} as soon as the loss's own backward is, everything else (the embedding, layers that are
 * not checkpointed) after the backward; each gradient is released (its buffer freed) right after its update, so the
 * full set of gradients never exists at once. The hook is
 * {@link ai.djl.memopt.checkpoint.CheckpointingGradientCollector#setSegmentListener}.
 *
 * <p>FP16: an overflow found in a later segment (an earlier layer, since backward runs in reverse) must not leave the
 * segments visited before it updated while the rest of the step is skipped. One pass with a per-segment scale: after
 * each outermost segment's backward, its gradients (its parameters', those of layers outside any segment that it
 * reached, and the gradient it produced for its input) are checked with one host read. Finite: they are updated at
 * the divisor in force and released. Not finite: they are dropped, the collector puts back the leaves' gradients it
 * reached and back-propagates the segment again with its upstream gradient times the scaler's backoff (0.5), and the
 * divisor is halved for it and for every segment visited after it (their gradients flow through it, so they carry the
 * halved scale). Each parameter is updated once, from finite gradients of this batch divided by the scale they were
 * computed at: the whole step, not a part of one. The scaler records the recovered overflow (the next step starts at
 * the lower scale) but the step is not skipped. An overflow in the head's gradients, before anything is updated, skips
 * the step as without fusion (the rest of the backward only frees gradients). A segment still not finite at the
 * minimum scale holds a genuine inf or NaN: {@link NonFiniteLossException}, naming it and the layers already updated.
 *
 * <p>A tied (shared) parameter accumulates gradients from several segments, which a per-segment scale would mix: such
 * a model takes two passes instead, a check pass (forward and backward reducing each group of gradients to a device
 * flag, nothing updated, one read at the end) and, when clean, an update pass. FP32 has no scale to retry with: one
 * pass, and a non-finite gradient is an error found after the backward, by which time the groups visited before it are
 * updated (the message says so; resume from a checkpoint). See docs/training.md.
 *
 * <pre>{@code
 * FusedUpdate fused = new FusedUpdate(lm, parameters, update);
 * lossHead.segmentListener = fused;
 * NDArray loss = fused.step(step + 1, scale, (factor, m) -> lossHead.forwardBackward(batch, factor, true, m), losses);
 * }</pre>
 */
final class FusedUpdate implements SegmentListener {

    /**
     * What the listener does with a finished group: check and release (the first of two FP16 passes), update and
     * release (FP32, the second FP16 pass), or check at once and update or retry (one FP16 pass, per-segment scale).
     */
    private enum Pass {
        CHECK,
        UPDATE,
        SCALED
    }

    private static final List<String> HEAD = FusedGroups.HEAD;
    /** Given zero gradient buffers at the start of every step (see {@link #run}). */
    private static final List<String> CREATED = FusedGroups.CREATED;

    private final FusedGroups groups;
    private final ParameterUpdate update;
    private final Set<String> done = new HashSet<>();
    private final GradientBuffers buffers = new GradientBuffers();
    /** Nested groups updated in the layer in progress whose FP16 working weights wait for it to finish. */
    private final List<String> deferred = new ArrayList<>();
    private Pass pass;
    private float divisor;
    private PassFlags flags;
    private long stepNumber;
    private boolean skipping; // one FP16 pass: the head overflowed, the rest of the backward only frees gradients
    private final List<String> updatedGroups = new ArrayList<>(); // for the message of a non-finite segment

    /** Whether the current pass only checks (the first of a two-pass FP16 step). */
    boolean checking() {
        return pass == Pass.CHECK;
    }

    /** Whether the last {@link #step} was skipped (an FP16 overflow). */
    boolean skipped;
    /** Groups updated during the backward in the last pass (for tests: the fusion really happened). */
    long fusedGroups;
    /** Groups of nested segments (a layer's halves, its experts) updated inside their layer's backward, besides those. */
    long nestedGroups;
    /** Forward and backward passes of the last step (1, or 2 for the two-pass FP16 form). */
    int passes;
    /** Segment backwards retried at a lower scale in the last step. */
    int retries;
    /** Whether the embedding's gradient goes through autograd (not row by row), so a segment's check includes it. */
    boolean embeddingByAutograd;
    /** Off: the embedding's buffer is made at the start of the step as before (a test seam: the two give one result). */
    boolean embeddingOnDemand = true;
    /** Called first at every listener call (a test seam: forcing an overflow in the middle of the backward). */
    Consumer<List<Block>> beforeGroup;
    /** {@link #beforeGroup} for the calls after nested segments, with the outermost segment's attempt. */
    java.util.function.BiConsumer<List<Block>, Integer> beforeNested;

    FusedUpdate(DeepSeekForCausalLM lm, Map<String, Parameter> parameters, ParameterUpdate update) {
        this.update = update;
        this.groups = new FusedGroups(lm, parameters);
    }

    /**
     * Whether the row-wise embedding gradient creates the table's gradient buffer only after the backward
     * ({@link EmbeddingRows#accumulate}) instead of it being made at the start of the step: a table-sized buffer
     * (65 MB for bench-small's in FP16) that would otherwise exist beside every layer's recomputation and backward.
     * Not for an embedding tied to the head, whose chunks write into the buffer before the layers' backward.
     */
    boolean embeddingBufferOnDemand() {
        Parameter embedding = groups.get(CREATED.get(0));
        return embeddingOnDemand && !embeddingByAutograd && embedding != null && !groups.isShared(embedding);
    }

    /** Whether FP16 steps take two passes (a tied parameter; see the class documentation). */
    boolean twoPass() {
        return groups.anyShared();
    }

    /**
     * One step: forward and backward through {@code forwardBackward} ({@code (loss factor, manager) -> mean loss}),
     * updating as the gradients complete (see the class documentation); returns the mean loss, a device scalar in
     * {@code losses}, and sets {@link #skipped}.
     *
     * @throws NonFiniteLossException if the loss or an FP32 gradient is not finite, or FP16 gradients overflow at the
     *     minimum scale
     */
    NDArray step(long step, float scale, BiFunction<Float, NDManager, NDArray> forwardBackward, NDManager losses) {
        skipped = false;
        passes = 0;
        retries = 0;
        stepNumber = step;
        DynamicLossScaler scaler = update.scaler();
        if (scaler == null) {
            NDArray loss = run(Pass.UPDATE, 1f, forwardBackward, losses);
            if (!finishedClean(loss)) {
                throw new NonFiniteLossException(step, "the loss is " + loss.getFloat() + " or a gradient holds NaN or"
                        + " infinite values (FP32 training with the fused update: the parameters whose backward came"
                        + " before it were already updated; resume from the last checkpoint)");
            }
            return loss;
        }
        if (!twoPass()) {
            return oneScaledPass(step, scale, forwardBackward, losses, scaler);
        }
        NDArray loss = run(Pass.CHECK, scale, forwardBackward, losses);
        if (!finishedClean(loss)) {
            skip(step, loss, scale, scaler);
            return loss;
        }
        scaler.update(false);
        loss.close();
        loss = run(Pass.UPDATE, scale, forwardBackward, losses);
        if (!finishedClean(loss)) {
            throw new IllegalStateException("the fused update's second pass found non-finite gradients the first pass"
                    + " did not (a non-deterministic forward or backward); the parameters visited before were updated");
        }
        return loss;
    }

    /** An FP16 step with nothing updated: a non-finite loss or an overflow at the minimum scale is an error. */
    private void skip(long step, NDArray loss, float scale, DynamicLossScaler scaler) {
        float value = loss.getFloat();
        if (!Float.isFinite(value)) {
            throw new NonFiniteLossException(step, "the loss is " + value + " (FP16): the weights, the"
                    + " activations or the data hold non-finite values; nothing was updated");
        }
        if (scale <= scaler.getMinScale()) {
            throw new NonFiniteLossException(step, "the FP16 gradients overflow even at the minimum loss scale "
                    + scaler.getMinScale() + "; nothing was updated");
        }
        scaler.update(true);
        skipped = true;
    }

    /** The FP16 step in one pass with a per-segment scale (see the class documentation). */
    private NDArray oneScaledPass(long step, float scale, BiFunction<Float, NDManager, NDArray> forwardBackward,
            NDManager losses, DynamicLossScaler scaler) {
        skipping = false;
        updatedGroups.clear();
        for (String name : groups.loose()) { // a gradient there now would be taken for one this backward reached
            if (GradientBuffers.exists(groups.get(name))) {
                drop(name);
            }
        }
        NDArray loss = run(Pass.SCALED, scale, forwardBackward, losses);
        List<String> rest = rest();
        try {
            if (skipping) {
                rest.forEach(this::drop);
                skip(step, loss, scale, scaler);
                return loss;
            }
            boolean clean;
            try (PhaseTimer.Phase p = PhaseTimer.phase("overflow check")) {
                clean = flags.finiteNow(rest, List.of(loss));
            }
            if (!clean) {
                rest.forEach(this::drop);
                throw new NonFiniteLossException(step, "the loss is " + loss.getFloat() + " or the gradient of "
                        + rest + " holds NaN or infinite values after the FP16 backward; the parameters of "
                        + updatedGroups + " were already updated; resume from the last checkpoint");
            }
            apply(rest);
            if (retries > 0) {
                scaler.recordRecoveredOverflow(retries);
            } else {
                scaler.update(false);
            }
            return loss;
        } finally {
            copyDeferred(); // done at each layer's end already, unless the step ended by an exception
            flags.close();
            flags = null;
            pass = null;
        }
    }

    private NDArray run(Pass p, float gradDivisor, BiFunction<Float, NDManager, NDArray> forwardBackward,
            NDManager losses) {
        pass = p;
        divisor = gradDivisor;
        done.clear();
        fusedGroups = 0;
        nestedGroups = 0;
        passes++;
        flags = new PassFlags(losses, groups);
        // the head gets its (zero) buffer back for the step: the hand-differentiated head chunks write into it; autograd
        // would build the head's weight gradient as an FP16 product, which on the CPU has no fast kernel (80 times
        // slower on bench-small); so does the embedding when it is tied to the head, while an embedding of its own
        // gets its buffer after the backward from the row-wise gradient (see embeddingBufferOnDemand)
        update.createGradients(embeddingBufferOnDemand() ? List.of(HEAD.get(0)) : CREATED);
        NDArray loss = forwardBackward.apply(gradDivisor, losses);
        if (p != Pass.SCALED) {
            apply(rest());
        }
        return loss;
    }

    /** The trainable parameters not updated yet. */
    private List<String> rest() {
        List<String> rest = new ArrayList<>();
        for (String name : groups.names()) {
            if (!done.contains(name)) {
                rest.add(name);
            }
        }
        return rest;
    }

    /** Whether the loss and every gradient of the pass were finite (one host read); ends the pass. */
    private boolean finishedClean(NDArray loss) {
        try {
            return flags.finishedClean(loss);
        } finally {
            flags = null;
            pass = null;
        }
    }

    /**
     * The collector's listener: after the loss's own backward (the head's parameters are complete), and after each
     * attempt of an outermost segment's backward (the parameters only its blocks use are complete).
     */
    @Override
    public Verdict segmentDone(Event e) {
        if (pass == null) {
            return Verdict.CONTINUE; // a backward outside a fused step (tests accumulating gradients)
        }
        if (beforeGroup != null) {
            beforeGroup.accept(e.blocks());
        }
        List<String> ready = new ArrayList<>();
        if (e.isHead()) {
            for (String name : HEAD) {
                Parameter p = groups.get(name);
                if (p != null && !groups.isShared(p) && !done.contains(name)) {
                    ready.add(name);
                }
            }
        } else {
            if (e.attempt() > 0) {
                dropStale(e.blocks());
            }
            for (Block b : e.blocks()) {
                for (String name : groups.exclusive(b)) {
                    if (!done.contains(name)) {
                        ready.add(name);
                    }
                }
            }
        }
        if (pass != Pass.SCALED) {
            if (!ready.isEmpty()) {
                fusedGroups++;
                apply(ready);
            }
            return Verdict.CONTINUE;
        }
        return scaled(e, ready);
    }

    /** {@link #segmentDone} in the one-pass FP16 step: check now, then update, or drop and ask for a retry. */
    private Verdict scaled(Event e, List<String> ready) {
        for (String name : groups.loose()) { // plain layers this backward reached: complete now
            if (!done.contains(name) && GradientBuffers.exists(groups.get(name))) {
                ready.add(name);
            }
        }
        if (skipping) {
            ready.forEach(this::drop);
            return Verdict.CONTINUE;
        }
        List<String> checked = new ArrayList<>(ready);
        if (e.inputHasGraph() && embeddingByAutograd) {
            for (String name : CREATED) {
                if (groups.names().contains(name) && !done.contains(name)) {
                    checked.add(name);
                }
            }
        }
        boolean clean;
        try (PhaseTimer.Phase p = PhaseTimer.phase("overflow check")) {
            clean = flags.finiteNow(checked, e.leafGradients());
        }
        if (clean) {
            if (!ready.isEmpty()) {
                fusedGroups++;
                updateAndRelease(ready);
                updatedGroups.add(e.isHead() ? "the head" : FusedGroups.label(e, ready));
            }
            copyDeferred();
            return Verdict.CONTINUE;
        }
        if (e.isHead()) {
            ready.forEach(this::drop);
            skipping = true; // nothing updated yet: skip the step as without fusion
            return Verdict.CONTINUE;
        }
        DynamicLossScaler scaler = update.scaler();
        float lower = divisor * scaler.getBackoffFactor();
        if (lower < scaler.getMinScale()) {
            copyDeferred();
            throw new NonFiniteLossException(stepNumber, "the FP16 gradients of " + FusedGroups.label(e, ready) + " are not finite"
                    + " even at the minimum loss scale " + scaler.getMinScale() + " (retried " + e.attempt()
                    + " times from " + divisor * (float) Math.pow(1 / scaler.getBackoffFactor(), e.attempt()) + "): a"
                    + " NaN or infinity in its weights, activations or data, not an overflow of the scale; the layers"
                    + " visited before it were already updated (" + updatedGroups + "): resume from the last"
                    + " checkpoint");
        }
        // zeroed in place, not released: the step's parameter store hands the retry the same arrays; the embedding's
        // buffer held zeros before any segment reached it
        List<String> reached = new ArrayList<>(ready);
        CREATED.stream().filter(n -> groups.names().contains(n) && !done.contains(n)).forEach(reached::add);
        for (String name : reached) {
            Parameter p = groups.get(name);
            if (GradientBuffers.exists(p)) {
                JniUtils.zeroGrad((PtNDArray) p.getArray());
            }
        }
        divisor = lower;
        retries++;
        return Verdict.retry(scaler.getBackoffFactor());
    }

    /**
     * A nested segment (the attention or MLP half of a layer, a routed expert) is done: the parameters only its blocks
     * use are updated and released at once, so that the layer's gradients never all exist together. In the one-pass
     * FP16 step they are checked first (one host read); not finite, they are left for the layer's own check, which
     * retries the layer. A retried layer is recomputed with the weights of its forward: the FP32 masters and moments
     * are updated here, the FP16 working weights only when the layer is done ({@link #copyDeferred}), and weights
     * without a master (FP32 islands) wait for the layer. Its nested segments are back-propagated again: their
     * parameters are done by then, and the new gradients are dropped at the layer's call ({@link #dropStale}).
     */
    @Override
    public void nestedSegmentDone(Event e) {
        if (pass == null) {
            return;
        }
        if (beforeNested != null) {
            beforeNested.accept(e.blocks(), e.attempt());
        }
        List<String> ready = new ArrayList<>();
        for (Block b : e.blocks()) {
            for (String name : groups.exclusive(b)) {
                if (!done.contains(name) && GradientBuffers.exists(groups.get(name))) {
                    ready.add(name);
                }
            }
        }
        if (ready.isEmpty()) {
            return;
        }
        if (pass != Pass.SCALED) {
            nestedGroups++;
            apply(ready);
            return;
        }
        if (skipping) {
            ready.forEach(this::drop);
            return;
        }
        // a weight without a master (an FP32 island: norms, the router) is updated in place, which a retried layer's
        // recomputation would see: those wait for the layer (they are small)
        ready.removeIf(name -> !update.masters().containsKey(name));
        if (ready.isEmpty()) {
            return;
        }
        boolean clean;
        try (PhaseTimer.Phase p = PhaseTimer.phase("overflow check")) {
            clean = flags.finiteNow(ready, List.of());
        }
        if (clean) {
            nestedGroups++;
            updateAndRelease(ready, false); // the layer may be recomputed yet, with the weights of its forward
        }
    }

    /** Writes the masters of the nested groups updated in the layer just finished into their working weights. */
    private void copyDeferred() {
        if (!deferred.isEmpty()) {
            try (PhaseTimer.Phase p = PhaseTimer.phase("optimizer")) {
                update.copyMastersToWorking(deferred);
            }
            deferred.clear();
        }
    }

    /** Drops the gradients that a retried segment's backward made again for parameters of {@code blocks} already done. */
    private void dropStale(List<Block> blocks) {
        for (Block b : blocks) {
            for (String name : groups.exclusive(b)) {
                if (done.contains(name) && GradientBuffers.exists(groups.get(name))) {
                    drop(name);
                }
            }
        }
    }

    @Override
    public boolean mayRetry() {
        return pass == Pass.SCALED && !skipping;
    }

    /** Checks a finished group's gradients into the pass's flag, updates them in an update pass, releases them. */
    private void apply(List<String> group) {
        if (group.isEmpty()) {
            return;
        }
        if (pass != Pass.SCALED) { // checked before in the one-pass form
            try (PhaseTimer.Phase p = PhaseTimer.phase("overflow check")) {
                flags.check(group);
            }
        }
        if (pass == Pass.CHECK) {
            group.forEach(this::drop);
            group.forEach(done::add);
        } else {
            updateAndRelease(group);
        }
    }

    private void updateAndRelease(List<String> group) {
        updateAndRelease(group, true);
    }

    /** Unless {@code writeWorking}, the FP16 working weights are left to {@link #copyDeferred}. */
    private void updateAndRelease(List<String> group, boolean writeWorking) {
        try (PhaseTimer.Phase p = PhaseTimer.phase("optimizer")) {
            // 8-bit moments: the group's buckets, planned once per group
            update.updateParameters(group, divisor, writeWorking);
        }
        if (!writeWorking) {
            deferred.addAll(group);
        }
        for (String name : group) {
            drop(name);
            done.add(name);
        }
    }

    /** Frees a parameter's gradient (not marking it done). */
    private void drop(String name) {
        buffers.release(groups.get(name));
    }
}
