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

    private static final String[] HEAD = {"lm_head.weight", "model.norm.weight"};
    /** Given zero gradient buffers at the start of every step (see {@link #run}). */
    private static final List<String> CREATED = List.of("model.embed_tokens.weight", "lm_head.weight");

    private final Map<String, Parameter> trainable = new java.util.LinkedHashMap<>();
    private final Map<Parameter, String> names = new IdentityHashMap<>();
    private final Set<Parameter> shared = java.util.Collections.newSetFromMap(new IdentityHashMap<>());
    /** Trainable, outside every checkpointed block, not in the head nor given a buffer: layers left plain. */
    private final List<String> loose = new ArrayList<>();
    private final Map<Block, List<String>> byBlock = new IdentityHashMap<>();
    private final ParameterUpdate update;
    private final Set<String> done = new HashSet<>();
    private final GradientBuffers buffers = new GradientBuffers();
    private Pass pass;
    private float divisor;
    private NDManager flags;
    private NDArray bad; // 0-dimensional boolean: a non-finite gradient seen in this pass
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
    /** Forward and backward passes of the last step (1, or 2 for the two-pass FP16 form). */
    int passes;
    /** Segment backwards retried at a lower scale in the last step. */
    int retries;
    /** Whether the embedding's gradient goes through autograd (not row by row), so a segment's check includes it. */
    boolean embeddingByAutograd;
    /** Called first at every listener call (a test seam: forcing an overflow in the middle of the backward). */
    Consumer<List<Block>> beforeGroup;

    FusedUpdate(DeepSeekForCausalLM lm, Map<String, Parameter> parameters, ParameterUpdate update) {
        this.update = update;
        Map<Parameter, Integer> uses = new IdentityHashMap<>();
        for (Parameter p : BlockTrees.parameters(lm).values()) {
            uses.merge(p, 1, Integer::sum);
        }
        if (lm.lmHead() == null) { // tied: the head reads the embedding table, which appears once in the tree
            uses.merge(lm.model().tokenEmbedding().weight(), 1, Integer::sum);
        }
        Set<Parameter> checkpointed = java.util.Collections.newSetFromMap(new IdentityHashMap<>());
        for (Block b : BlockTrees.walk(lm).values()) {
            if (isCheckpointed(b)) {
                checkpointed.addAll(BlockTrees.parameters(b).values());
            }
        }
        for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
            Parameter p = e.getValue();
            if (p.requiresGradient()) {
                trainable.put(e.getKey(), p);
                names.put(p, e.getKey());
                if (uses.getOrDefault(p, 1) > 1) {
                    shared.add(p); // tied: its gradient is complete only after the whole backward
                } else if (!checkpointed.contains(p) && !CREATED.contains(e.getKey())
                        && !List.of(HEAD).contains(e.getKey())) {
                    loose.add(e.getKey());
                }
            }
        }
    }

    private static boolean isCheckpointed(Block b) {
        for (Block d = b; ; d = ((BlockDecorator) d).delegate()) {
            if (d instanceof CheckpointBlock) {
                return true;
            }
            if (!(d instanceof BlockDecorator)) {
                return false;
            }
        }
    }

    /** Whether FP16 steps take two passes (a tied parameter; see the class documentation). */
    boolean twoPass() {
        return !shared.isEmpty();
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
        for (String name : loose) { // a gradient there now would be taken for one this backward reached
            if (GradientBuffers.exists(trainable.get(name))) {
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
                clean = finiteNow(rest, List.of(loss));
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
            flags.close();
            flags = null;
            bad = null;
            pass = null;
        }
    }

    private NDArray run(Pass p, float gradDivisor, BiFunction<Float, NDManager, NDArray> forwardBackward,
            NDManager losses) {
        pass = p;
        divisor = gradDivisor;
        done.clear();
        fusedGroups = 0;
        passes++;
        flags = losses.newSubManager();
        bad = null;
        // the embedding and head get their (zero) buffers back for the step: the row-wise embedding gradient and the
        // hand-differentiated head chunks write into them; autograd would build the head's weight gradient as an FP16
        // product, which on the CPU has no fast kernel (80 times slower on bench-small)
        update.createGradients(CREATED);
        NDArray loss = forwardBackward.apply(gradDivisor, losses);
        if (p != Pass.SCALED) {
            apply(rest());
        }
        return loss;
    }

    /** The trainable parameters not updated yet. */
    private List<String> rest() {
        List<String> rest = new ArrayList<>();
        for (String name : trainable.keySet()) {
            if (!done.contains(name)) {
                rest.add(name);
            }
        }
        return rest;
    }

    /** Whether the loss and every gradient of the pass were finite (one host read); ends the pass. */
    private boolean finishedClean(NDArray loss) {
        try (NDManager f = flags) {
            NDArray lossBad = loss.isInfinite().logicalOr(loss.isNaN());
            lossBad.attach(f);
            NDArray any = bad == null ? lossBad : bad.logicalOr(lossBad);
            any.attach(f);
            return !any.getBoolean();
        } finally {
            flags = null;
            bad = null;
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
                Parameter p = trainable.get(name);
                if (p != null && !shared.contains(p) && !done.contains(name)) {
                    ready.add(name);
                }
            }
        } else {
            for (Block b : e.blocks()) {
                for (String name : byBlock.computeIfAbsent(b, this::exclusiveNames)) {
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
        for (String name : loose) { // plain layers this backward reached: complete now
            if (!done.contains(name) && GradientBuffers.exists(trainable.get(name))) {
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
                if (trainable.containsKey(name) && !done.contains(name)) {
                    checked.add(name);
                }
            }
        }
        boolean clean;
        try (PhaseTimer.Phase p = PhaseTimer.phase("overflow check")) {
            clean = finiteNow(checked, e.leafGradients());
        }
        if (clean) {
            if (!ready.isEmpty()) {
                fusedGroups++;
                updateAndRelease(ready);
                updatedGroups.add(e.isHead() ? "the head" : label(e, ready));
            }
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
            throw new NonFiniteLossException(stepNumber, "the FP16 gradients of " + label(e, ready) + " are not finite"
                    + " even at the minimum loss scale " + scaler.getMinScale() + " (retried " + e.attempt()
                    + " times from " + divisor * (float) Math.pow(1 / scaler.getBackoffFactor(), e.attempt()) + "): a"
                    + " NaN or infinity in its weights, activations or data, not an overflow of the scale; the layers"
                    + " visited before it were already updated (" + updatedGroups + "): resume from the last"
                    + " checkpoint");
        }
        // zeroed in place, not released: the step's parameter store hands the retry the same arrays; the embedding's
        // buffer held zeros before any segment reached it
        List<String> reached = new ArrayList<>(ready);
        CREATED.stream().filter(n -> trainable.containsKey(n) && !done.contains(n)).forEach(reached::add);
        for (String name : reached) {
            Parameter p = trainable.get(name);
            if (GradientBuffers.exists(p)) {
                JniUtils.zeroGrad((PtNDArray) p.getArray());
            }
        }
        divisor = lower;
        retries++;
        return Verdict.retry(scaler.getBackoffFactor());
    }

    @Override
    public boolean mayRetry() {
        return pass == Pass.SCALED && !skipping;
    }

    /** A group's name for messages: the common prefix of its parameters' names, or the segment's name. */
    private static String label(Event e, List<String> group) {
        String prefix = group.isEmpty() ? "" : group.get(0);
        for (String name : group) {
            prefix = com.google.common.base.Strings.commonPrefix(prefix, name);
        }
        int dot = prefix.lastIndexOf('.');
        String block = "checkpointed block '" + e.name() + "'";
        return dot > 0 ? prefix.substring(0, dot) + " (" + block + ")" : block;
    }

    private List<String> exclusiveNames(Block block) {
        List<String> out = new ArrayList<>();
        for (Parameter p : BlockTrees.parameters(block).values()) {
            String name = names.get(p);
            if (name != null && !shared.contains(p) && !out.contains(name)) {
                out.add(name);
            }
        }
        return out;
    }

    /** Checks a finished group's gradients into the pass's flag, updates them in an update pass, releases them. */
    private void apply(List<String> group) {
        if (group.isEmpty()) {
            return;
        }
        if (pass != Pass.SCALED) { // checked before in the one-pass form
            try (PhaseTimer.Phase p = PhaseTimer.phase("overflow check")) {
                check(group);
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
        try (PhaseTimer.Phase p = PhaseTimer.phase("optimizer")) {
            update.updateParameters(group, divisor); // 8-bit moments: the group's buckets, planned once per group
        }
        for (String name : group) {
            drop(name);
            done.add(name);
        }
    }

    /** Frees a parameter's gradient (not marking it done). */
    private void drop(String name) {
        buffers.release(trainable.get(name));
    }

    /** Whether every gradient of {@code group} and every array of {@code more} is finite: one host read. */
    private boolean finiteNow(List<String> group, List<NDArray> more) {
        try (NDManager t = flags.newSubManager()) {
            NDArray groupBad = nonFinite(group, more, t);
            return groupBad == null || !groupBad.getBoolean();
        }
    }

    /** ORs "some gradient of the group is not finite" into the pass's flag, on the device (no read). */
    private void check(List<String> group) {
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

    /** {@link GradientBuffers#nonFinite} of the gradients of {@code group} and the arrays {@code more}. */
    private NDArray nonFinite(List<String> group, List<NDArray> more, NDManager t) {
        List<NDArray> arrays = new ArrayList<>(more);
        for (String name : group) {
            NDArray g = JniUtils.getGradient((PtNDArray) trainable.get(name).getArray());
            if (g != null) {
                g.attach(t);
                arrays.add(g);
            }
        }
        return GradientBuffers.nonFinite(arrays, t);
    }

}
