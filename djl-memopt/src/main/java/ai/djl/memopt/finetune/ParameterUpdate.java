package ai.djl.memopt.finetune;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.PhaseTimer;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableMap;
import java.util.ArrayList;
import java.util.Collections;
import java.util.IdentityHashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * The parameter update of a training step, once the gradients of all micro-batches are accumulated: in FP32 the
 * {@link StatefulOptimizer} updates each trainable weight in place; in FP16 (mixed precision) the gradients of the FP16
 * working weights are checked for overflow, unscaled by the {@link DynamicLossScaler}'s scale, applied to the FP32
 * masters and the masters copied back into the working weights, or the whole step is skipped and the scale lowered.
 * Either way the gradients are zeroed for the next step.
 *
 * <p>In the GPU form ({@link #gpuForms}, the default on a GPU) the check of the loss and of every gradient is one device
 * reduction and one host read ({@link #lossAndGradientsFinite}) instead of reads per parameter, and the optimizer updates
 * flat buckets of parameters ({@link StatefulOptimizer#updateAll}): on a GPU every host read waits for the device's
 * queue, and every small operation is a kernel launch.
 *
 * <p>It also owns the view of the weights that checkpoints save and restore: the FP32 value of each weight (the master
 * where there is one) and writing a restored FP32 value into master and working copy.
 *
 * <pre>{@code
 * ParameterUpdate update = ParameterUpdate.fp16(lm, parameters, optimizer, DynamicLossScaler.create());
 * boolean applied = update.apply(update.lossScale()); // after backward(loss * scale)
 * }</pre>
 */
final class ParameterUpdate {

    private final Map<String, Parameter> parameters;
    private Map<String, NDArray> masters;
    private final MixedPrecisionBlock mixed; // null in FP32
    private final StatefulOptimizer optimizer;
    /** Whether the masters and the optimizer state live on the host ({@link #offload}). */
    private boolean offloaded;
    private DynamicLossScaler scaler;
    private final GradientCheck check;
    /** The GPU forms of the check and the update (see the class documentation); settable by tests. */
    boolean gpuForms;

    private ParameterUpdate(Map<String, Parameter> parameters, Map<String, NDArray> masters,
            MixedPrecisionBlock mixed, StatefulOptimizer optimizer, DynamicLossScaler scaler) {
        this.parameters = parameters;
        this.masters = masters;
        this.mixed = mixed;
        this.optimizer = optimizer;
        this.scaler = scaler;
        this.check = new GradientCheck(parameters);
        this.gpuForms = !parameters.isEmpty()
                && parameters.values().iterator().next().getArray().getDevice().isGpu();
    }

    /** FP32 training: the optimizer updates the weights themselves. */
    static ParameterUpdate fp32(Map<String, Parameter> parameters, StatefulOptimizer optimizer) {
        return new ParameterUpdate(parameters, Map.of(), null, optimizer, null);
    }

    /**
     * FP16 training: wraps the whole model in a {@link MixedPrecisionBlock}: FP16 working copies of every weight except
     * the FP32 islands of the default {@link ai.djl.memopt.precision.PrecisionPolicy} (RMS norms and the MoE router),
     * so the residual stream, projections and experts run and store their activations in FP16, while the model itself
     * computes softmax, rotary and the MoE combination in FP32 and returns FP32 logits. The wrapper only casts floating
     * inputs and outputs (token ids pass through), so the model is called directly afterwards.
     *
     * @param parameters the model's parameters by Hugging Face name (the same objects after the wrapping)
     */
    static ParameterUpdate fp16(DeepSeekForCausalLM lm, Map<String, Parameter> parameters,
            StatefulOptimizer optimizer, DynamicLossScaler scaler) {
        MixedPrecisionBlock mixed = MixedPrecisionBlock.wrap(lm);
        Map<String, NDArray> masters = new LinkedHashMap<>();
        for (MixedPrecisionBlock.MasterWeight w : mixed.masterWeights()) {
            masters.put(w.path(), w.master());
        }
        return new ParameterUpdate(parameters, Collections.unmodifiableMap(masters), mixed, optimizer, scaler);
    }

    /** The model's parameters by Hugging Face name, each once (a tied weight under its first name). */
    static Map<String, Parameter> uniqueParameters(DeepSeekForCausalLM lm) {
        Map<String, Parameter> params = new LinkedHashMap<>();
        Set<Parameter> seen = Collections.newSetFromMap(new IdentityHashMap<>());
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(lm).entrySet()) {
            if (seen.add(e.getValue())) {
                params.put(e.getKey(), e.getValue());
            }
        }
        return ImmutableMap.copyOf(params);
    }

    /**
     * Moves the FP32 masters to {@code host} (in FP32 mode: gives each trainable weight a host copy as its master) so
     * that the optimizer's state, made beside the masters, lives there too; from then on each parameter's gradient is
     * copied to the host, the update runs there and the weight is copied back into the working copy
     * ({@link #updateParameter}). Where the weights already are on {@code host} (training on the CPU) nothing moves and
     * FP32 weights stay their own masters, but the update takes the same path.
     */
    void offload(Device host) {
        Preconditions.checkState(optimizer.stateBytes() == 0, "offload the optimizer before its first update");
        offloaded = true;
        Map<String, NDArray> moved = new LinkedHashMap<>();
        if (mixed != null) {
            for (MixedPrecisionBlock.MasterWeight w : mixed.moveMasters(host)) {
                moved.put(w.path(), w.master());
            }
        } else {
            for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
                NDArray w = e.getValue().getArray();
                if (e.getValue().requiresGradient() && !w.getDevice().equals(host)) {
                    try (NDArray detached = w.stopGradient()) {
                        NDArray copy = detached.toDevice(host, true);
                        copy.attach(optimizer.manager);
                        moved.put(e.getKey(), copy);
                    }
                }
            }
        }
        masters = Collections.unmodifiableMap(moved);
        if (parameters.values().stream().anyMatch(p -> p.isInitialized() && p.getArray().getDevice().isGpu())) {
            // the device copies of the masters are freed, but CUDA's caching allocator would keep their blocks for
            // itself: give them back, so that what the device holds is the FP16 weights, not their old masters too
            JniUtils.emptyCudaCache();
        }
    }

    /** Whether {@link #offload} was called. */
    boolean offloaded() {
        return offloaded;
    }

    /**
     * Updates one trainable parameter from its gradient divided by {@code gradDivisor}, without zeroing the gradient:
     * on the master's device (the host when offloaded: the gradient is copied there, the updated master copied back
     * into the working weight). A parameter without a gradient buffer is left alone.
     */
    void updateParameter(String name, float gradDivisor) {
        updateParameter(name, gradDivisor, true);
    }

    /** {@link #updateParameter(String, float)}, leaving an FP16 working weight as it is unless {@code writeWorking}. */
    private void updateParameter(String name, float gradDivisor, boolean writeWorking) {
        Parameter p = parameters.get(name);
        NDArray w = p.getArray();
        NDArray master = masters.get(name);
        NDArray target = master != null ? master : w;
        try (NDManager t = optimizer.manager.newSubManager(target.getDevice())) {
            NDArray g = JniUtils.getGradient((PtNDArray) w);
            if (g == null) {
                return;
            }
            g.attach(t);
            if (!g.getDevice().equals(target.getDevice())) {
                g = g.toDevice(target.getDevice(), false);
                g.attach(t);
            }
            if (offloaded && master != null) {
                optimizer.update(p.getId(), master, g, gradDivisor, null);
                if (writeWorking) {
                    MixedPrecisionBlock.copyInto(master, w); // one converting transfer back
                }
            } else {
                optimizer.update(p.getId(), target, g, gradDivisor, master != null && writeWorking ? w : null);
            }
        }
    }

    /**
     * Updates the trainable parameters {@code names} (a fused update's group) as {@link #updateParameter} does one by
     * one, without zeroing their gradients; with 8-bit moments in the GPU form, unless offloaded, through
     * {@link StatefulOptimizer#updateAll} (flat buckets planned once for this list; the same bits).
     */
    void updateParameters(List<String> names, float gradDivisor) {
        updateParameters(names, gradDivisor, true);
    }

    /**
     * {@link #updateParameters(List, float)}; unless {@code writeWorking}, FP16 working weights keep their values
     * (the masters and moments are updated) until {@link #copyMastersToWorking}: the fused update's nested groups,
     * whose layer may still be recomputed with the weights of its forward (a retry at a lower loss scale).
     */
    void updateParameters(List<String> names, float gradDivisor, boolean writeWorking) {
        // AdamW's flat buckets are planned for one id list (the whole model's): a group would re-plan them each time
        if (offloaded || !gpuForms || optimizer.eightBit() == null) {
            for (String name : names) {
                updateParameter(name, gradDivisor, writeWorking);
            }
            return;
        }
        updateTogether(names, gradDivisor, true, writeWorking);
    }

    /** Copies the FP32 masters of {@code names} into their FP16 working weights (see {@link #updateParameters}). */
    void copyMastersToWorking(Iterable<String> names) {
        for (String name : names) {
            NDArray master = masters.get(name);
            if (master != null) {
                MixedPrecisionBlock.copyInto(master, parameters.get(name).getArray());
            }
        }
    }

    /**
     * The parameters {@code names} through one {@link StatefulOptimizer#updateAll} call (flat buckets when
     * {@code bucketed}), FP16 working weights receiving their masters; those without a gradient are left alone.
     */
    private void updateTogether(Iterable<String> names, float gradDivisor, boolean bucketed, boolean writeWorking) {
        try (NDManager t = optimizer.manager.newSubManager()) {
            List<String> ids = new ArrayList<>();
            List<NDArray> weights = new ArrayList<>();
            List<NDArray> grads = new ArrayList<>();
            List<NDArray> copies = new ArrayList<>();
            for (String name : names) {
                Parameter p = parameters.get(name);
                NDArray g = JniUtils.getGradient((PtNDArray) p.getArray());
                if (g == null) {
                    continue;
                }
                g.attach(t);
                NDArray master = masters.get(name);
                ids.add(p.getId());
                weights.add(master != null ? master : p.getArray());
                grads.add(g);
                copies.add(master != null && writeWorking ? p.getArray() : null);
            }
            optimizer.updateAll(ids, weights, grads, gradDivisor, copies, bucketed);
        }
    }

    /** The FP32 masters of the trainable weights by Hugging Face name (empty in FP32 mode). */
    Map<String, NDArray> masters() {
        return masters;
    }

    /** The loss scaler (FP16) or null. */
    DynamicLossScaler scaler() {
        return scaler;
    }

    void setScaler(DynamicLossScaler scaler) {
        this.scaler = scaler;
    }

    /** The loss scale the next step will use (1 in FP32). */
    float lossScale() {
        return scaler != null ? scaler.getScale() : 1f;
    }

    /**
     * Applies the accumulated gradients of step {@code step}, computed with the loss times {@code scale}, and zeroes
     * them.
     *
     * @param loss the step's summed loss, a device scalar, checked with the gradients before anything is updated
     * @return false if the step was skipped (an FP16 overflow; the scale is lowered)
     * @throws NonFiniteLossException if the loss is not finite, an FP32 gradient is not finite, or FP16 gradients
     *     overflow at the minimum scale (nothing is updated)
     */
    boolean apply(float scale, long step, NDArray loss) {
        String nonFinite;
        try (PhaseTimer.Phase p = PhaseTimer.phase("overflow check")) {
            nonFinite = gpuForms && lossAndGradientsFinite(loss) ? null : firstNonFinite(loss);
        }
        if (LOSS.equals(nonFinite)) { // not a scaling matter: the forward pass itself overflowed or met NaN
            zeroGradients();
            throw new NonFiniteLossException(step, "the loss is " + loss.getFloat() + " ("
                    + (scaler != null ? "FP16" : "FP32") + "): the weights, the activations or the data hold"
                    + " non-finite values; nothing was updated");
        }
        if (scaler == null) {
            if (nonFinite != null) {
                zeroGradients();
                throw new NonFiniteLossException(step, "the gradient of " + nonFinite + " holds NaN or infinite"
                        + " values (FP32 training, so not a loss-scale overflow); nothing was updated");
            }
            try (PhaseTimer.Phase p = PhaseTimer.phase("optimizer")) {
                updateAll(1f);
            }
            return true;
        }
        float minScale = Float.parseFloat(scaler.state().get("min_scale"));
        if (nonFinite != null && scale <= minScale) {
            zeroGradients();
            throw new NonFiniteLossException(step, "the FP16 gradient of " + nonFinite + " overflows even at the"
                    + " minimum loss scale " + minScale + "; nothing was updated");
        }
        try (PhaseTimer.Phase p = PhaseTimer.phase("optimizer")) {
            return updateFp16(scale, nonFinite == null);
        }
    }

    /** What {@link #firstNonFinite} returns for a non-finite loss. */
    private static final String LOSS = "<loss>";

    /**
     * {@link #LOSS} if the loss is not finite, else the name of the first trainable parameter whose gradient holds inf
     * or NaN, or null if all are finite.
     */
    private String firstNonFinite(NDArray loss) {
        return Float.isFinite(loss.getFloat()) ? check.firstNonFiniteGradient() : LOSS;
    }

    /**
     * The FP16 update: if the check found no inf/NaN in the (scaled) gradients as they are, the gradients are unscaled
     * into FP32, applied to the FP32 masters and the masters copied into the FP16 working weights
     * ({@link #updateAll}); parameter by parameter in blocks of rows on the CPU, where only one block's FP32 gradient
     * and FP16 copy exist at a time. {@code MixedPrecisionOptimizer} unscales every gradient to FP32 before the check, a
     * transient copy of 4 bytes per FP16 parameter (about 1.1 GB for bench-small) that would dominate a step's memory.
     *
     * @param finite whether every gradient is finite (the result of the check)
     */
    private boolean updateFp16(float scale, boolean finite) {
        if (!scaler.update(!finite)) {
            zeroGradients();
            return false;
        }
        updateAll(scale);
        return true;
    }

    /**
     * Every trainable parameter through {@link StatefulOptimizer#updateAll}, FP16 working weights receiving their
     * updated masters, gradients divided by {@code gradDivisor} (the loss scale): on flat buckets in the GPU form, else
     * parameter by parameter in blocks of rows; then the gradients are zeroed.
     */
    private void updateAll(float gradDivisor) {
        if (offloaded) {
            for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
                if (e.getValue().requiresGradient()) {
                    updateParameter(e.getKey(), gradDivisor);
                }
            }
            zeroGradients();
            return;
        }
        List<String> trainable = new ArrayList<>();
        for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
            if (e.getValue().requiresGradient()) {
                trainable.add(e.getKey());
            }
        }
        updateTogether(trainable, gradDivisor, gpuForms, true);
        zeroGradients();
    }

    /** See {@link GradientCheck#lossAndGradientsFinite}. */
    boolean lossAndGradientsFinite(NDArray loss) {
        return check.lossAndGradientsFinite(loss);
    }

    /** Zeroes the gradient buffers of the trainable parameters that have one. */
    void zeroGradients() {
        for (Parameter p : parameters.values()) {
            if (p.requiresGradient() && p.getArray() instanceof PtNDArray) {
                try (NDArray g = JniUtils.getGradient((PtNDArray) p.getArray())) {
                    if (g != null) { // released by a fused update
                        JniUtils.zeroGrad((PtNDArray) p.getArray());
                    }
                }
            }
        }
    }

    /**
     * Gives every trainable parameter a zero gradient buffer, the state of a run after its first step (gradients are
     * zeroed, not freed). A restored run resumes from there: with the buffers, its next step takes the paths the
     * uninterrupted run took (the embedding gradient row by row, the head's chunks by hand; both need the buffer),
     * summing in the same order, so it gives the same weights bit for bit.
     */
    void createGradients() {
        createGradients(parameters.keySet());
    }

    /** {@link #createGradients()} for the parameters {@code names} only (unknown names are ignored). */
    void createGradients(java.util.Collection<String> names) {
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(true);
        try {
            for (String name : names) {
                Parameter p = parameters.get(name);
                if (p == null || !p.requiresGradient() || !(p.getArray() instanceof PtNDArray)) {
                    continue;
                }
                PtNDArray w = (PtNDArray) p.getArray();
                PtNDArray existing = JniUtils.getGradient(w);
                if (existing != null) {
                    existing.close();
                    continue;
                }
                try (NDManager m = w.getManager().newSubManager()) {
                    NDArray sum = w.sum(); // d sum / d w = 1, times a zero seed: a zero gradient of w's shape and type
                    sum.attach(m);
                    NDArray seed = sum.zerosLike();
                    seed.attach(m);
                    JniUtils.backward((PtNDArray) sum, (PtNDArray) seed, false, false);
                }
            }
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }

    /** See {@link GradientCheck#allFinite}. */
    static boolean allFinite(NDArray a) {
        return GradientCheck.allFinite(a);
    }

    /** The FP32 value of each weight (the master in FP16 mode), by Hugging Face name. */
    Map<String, NDArray> fp32Weights() {
        Map<String, NDArray> out = new LinkedHashMap<>();
        for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
            NDArray master = masters.get(e.getKey());
            out.put(e.getKey(), master != null ? master : e.getValue().getArray());
        }
        return out;
    }

    /**
     * Writes a restored FP32 value of the weight {@code name} into its master (if any) and its working copy, with
     * autograd off by the caller.
     */
    void setWeight(String name, NDArray fp32) {
        NDArray w = parameters.get(name).getArray();
        NDArray master = masters.get(name);
        if (master != null) {
            try (NDArray there = fp32.toDevice(master.getDevice(), true)) { // the host when offloaded
                master.set(new NDIndex("..."), there);
            }
        }
        w.set(new NDIndex("..."), fp32.toType(w.getDataType(), false));
    }

    /** Bytes of weights, FP32 masters, existing gradients and optimizer state, from the arrays. */
    StateBytes stateBytes() {
        long weights = 0;
        long grads = 0;
        for (Parameter p : parameters.values()) {
            NDArray w = p.getArray();
            weights += bytes(w);
            if (w instanceof PtNDArray && w.hasGradient()) {
                NDArray g = JniUtils.getGradient((PtNDArray) w);
                if (g != null) {
                    grads += bytes(g);
                    g.close();
                }
            }
        }
        long masterBytes = 0;
        for (NDArray a : masters.values()) {
            masterBytes += bytes(a);
        }
        long optimizerBytes = optimizer.stateBytes();
        return new StateBytes(weights, masterBytes, grads, optimizerBytes,
                offloaded ? masterBytes + optimizerBytes : 0);
    }

    private static long bytes(NDArray a) {
        return a.size() * a.getDataType().getNumOfBytes();
    }
}
