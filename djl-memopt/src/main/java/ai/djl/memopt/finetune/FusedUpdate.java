package ai.djl.memopt.finetune;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.PhaseTimer;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.memopt.precision.ParameterArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
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
 * <p>FP16 needs a second look: an overflow found in a later segment (an earlier layer, since backward runs in reverse)
 * must not leave the segments visited before it updated. A step is therefore two passes. The first runs forward and
 * backward with the listener only reducing each finished group of gradients to a device flag (their maximum and
 * minimum: finite exactly when every element is) and releasing them; one host read at the end says whether the step is
 * clean. On an overflow, nothing was touched: the scale is halved and the step skipped, as without fusion. Otherwise the
 * second pass repeats forward and backward (deterministic, the same gradients) and updates as it goes; its flag is
 * checked too, and a difference is an error, not a silent partial step. The price is one more forward and backward per
 * FP16 step; the memory is the point. FP32 has no scale to retry with: a non-finite gradient is an error
 * ({@link NonFiniteLossException}), found after the backward, by which time the groups visited before it are updated
 * (the message says so; resume from a checkpoint). See docs/training.md.
 *
 * <pre>{@code
 * FusedUpdate fused = new FusedUpdate(lm, parameters, update);
 * lossHead.segmentListener = fused::segmentDone;
 * NDArray loss = fused.step(step + 1, scale, (factor, m) -> lossHead.forwardBackward(batch, factor, true, m), losses);
 * }</pre>
 */
final class FusedUpdate {

    /** What the listener does with a finished group: check and release, or check, update and release. */
    private enum Pass {
        CHECK,
        UPDATE
    }

    private static final String[] HEAD = {"lm_head.weight", "model.norm.weight"};

    private final Map<String, Parameter> trainable = new java.util.LinkedHashMap<>();
    private final Map<Parameter, String> names = new IdentityHashMap<>();
    private final Set<Parameter> shared = java.util.Collections.newSetFromMap(new IdentityHashMap<>());
    private final Map<Block, List<String>> byBlock = new IdentityHashMap<>();
    private final ParameterUpdate update;
    private final Set<String> done = new HashSet<>();
    /** Parameters whose array is torch-allocated (copied once by {@link #release}). */
    private final Set<Parameter> owned = java.util.Collections.newSetFromMap(new IdentityHashMap<>());
    private Pass pass;
    private float divisor;
    private NDManager flags;
    private NDArray bad; // 0-dimensional boolean: a non-finite gradient seen in this pass
    /** Whether the current pass only checks (the first of an FP16 step). */
    boolean checking() {
        return pass == Pass.CHECK;
    }

    /** Whether the last {@link #step} was skipped (an FP16 overflow). */
    boolean skipped;
    /** Groups updated during the backward in the last pass (for tests: the fusion really happened). */
    long fusedGroups;
    /** Called first at every listener call (a test seam: forcing an overflow in the middle of the backward). */
    Consumer<List<Block>> beforeGroup;

    FusedUpdate(DeepSeekForCausalLM lm, Map<String, Parameter> parameters, ParameterUpdate update) {
        this.update = update;
        Map<Parameter, Integer> uses = new IdentityHashMap<>();
        for (Parameter p : BlockTrees.parameters(lm).values()) {
            uses.merge(p, 1, Integer::sum);
        }
        for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
            if (e.getValue().requiresGradient()) {
                trainable.put(e.getKey(), e.getValue());
                names.put(e.getValue(), e.getKey());
                if (uses.getOrDefault(e.getValue(), 1) > 1) {
                    shared.add(e.getValue()); // tied: its gradient is complete only after the whole backward
                }
            }
        }
    }

    /**
     * One step: forward and backward through {@code pass} ({@code (loss factor, manager) -> mean loss}), updating as
     * the gradients complete, two passes in FP16 (see the class documentation); returns the mean loss, a device scalar
     * in {@code losses}, and sets {@link #skipped}.
     *
     * @throws NonFiniteLossException if the loss or an FP32 gradient is not finite, or FP16 gradients overflow at the
     *     minimum scale
     */
    NDArray step(long step, float scale, BiFunction<Float, NDManager, NDArray> forwardBackward, NDManager losses) {
        skipped = false;
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
        NDArray loss = run(Pass.CHECK, scale, forwardBackward, losses);
        if (!finishedClean(loss)) {
            float value = loss.getFloat();
            if (!Float.isFinite(value)) {
                throw new NonFiniteLossException(step, "the loss is " + value + " (FP16): the weights, the"
                        + " activations or the data hold non-finite values; nothing was updated");
            }
            float minScale = Float.parseFloat(scaler.state().get("min_scale"));
            if (scale <= minScale) {
                throw new NonFiniteLossException(step, "the FP16 gradients overflow even at the minimum loss scale "
                        + minScale + "; nothing was updated");
            }
            scaler.update(true);
            skipped = true;
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

    private NDArray run(Pass p, float gradDivisor, BiFunction<Float, NDManager, NDArray> forwardBackward,
            NDManager losses) {
        pass = p;
        divisor = gradDivisor;
        done.clear();
        fusedGroups = 0;
        flags = losses.newSubManager();
        bad = null;
        // the embedding and head get their (zero) buffers back for the step: the row-wise embedding gradient and the
        // hand-differentiated head chunks write into them; autograd would build the head's weight gradient as an FP16
        // product, which on the CPU has no fast kernel (80 times slower on bench-small)
        update.createGradients(List.of("model.embed_tokens.weight", "lm_head.weight"));
        NDArray loss = forwardBackward.apply(gradDivisor, losses);
        List<String> rest = new ArrayList<>();
        for (String name : trainable.keySet()) {
            if (!done.contains(name)) {
                rest.add(name);
            }
        }
        apply(rest);
        return loss;
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
     * The collector's listener: an empty list after the loss's own backward (the head's parameters are complete), else
     * an outermost segment's blocks (the parameters only they use are complete).
     */
    void segmentDone(List<Block> blocks) {
        if (pass == null) {
            return; // a backward outside a fused step (tests accumulating gradients)
        }
        if (beforeGroup != null) {
            beforeGroup.accept(blocks);
        }
        List<String> ready = new ArrayList<>();
        if (blocks.isEmpty()) {
            for (String name : HEAD) {
                Parameter p = trainable.get(name);
                if (p != null && !shared.contains(p) && !done.contains(name)) {
                    ready.add(name);
                }
            }
        } else {
            for (Block b : blocks) {
                for (String name : byBlock.computeIfAbsent(b, this::exclusiveNames)) {
                    if (!done.contains(name)) {
                        ready.add(name);
                    }
                }
            }
        }
        if (!ready.isEmpty()) {
            fusedGroups++;
            apply(ready);
        }
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
        try (PhaseTimer.Phase p = PhaseTimer.phase("overflow check")) {
            check(group);
        }
        if (pass == Pass.UPDATE) {
            try (PhaseTimer.Phase p = PhaseTimer.phase("optimizer")) {
                for (String name : group) {
                    update.updateParameter(name, divisor);
                }
            }
        }
        for (String name : group) {
            release(trainable.get(name));
            done.add(name);
        }
    }

    /** ORs "some gradient of the group is not finite" into the pass's flag, on the device (no read). */
    private void check(List<String> group) {
        try (NDManager t = flags.newSubManager()) {
            NDList extremes = new NDList();
            for (String name : group) {
                NDArray g = JniUtils.getGradient((PtNDArray) trainable.get(name).getArray());
                if (g == null) {
                    continue;
                }
                g.attach(t);
                for (NDArray x : new NDArray[] {g.max(), g.min()}) {
                    x.attach(t);
                    NDArray x32 = x.toType(DataType.FLOAT32, false).reshape(1);
                    x32.attach(t);
                    extremes.add(x32);
                }
            }
            if (extremes.isEmpty()) {
                return;
            }
            NDArray all = NDArrays.concat(extremes);
            all.attach(t);
            NDArray groupBad = all.isInfinite().logicalOr(all.isNaN()).any();
            NDArray next = bad == null ? groupBad : bad.logicalOr(groupBad);
            next.attach(flags);
            if (next != groupBad) {
                groupBad.close();
            }
            if (bad != null) {
                bad.close();
            }
            bad = next;
        }
    }

    /**
     * Frees a parameter's gradient buffer: DJL cannot set {@code grad = None}, so the parameter gets a new handle (a
     * leaf that requires grad, with no gradient yet) and the old handle is closed; the next backward allocates a fresh
     * buffer. The new handle shares the storage (a detached alias) once the storage is torch's own; the first time, it
     * is a copy: an array DJL made from Java memory (weights created or loaded on the CPU) lives on a direct buffer
     * that only the old handle keeps reachable, and the garbage collector would free it under the alias.
     */
    private void release(Parameter p) {
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
