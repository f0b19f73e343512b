package ai.djl.memopt.finetune;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import com.google.common.collect.ImmutableMap;
import java.util.Collections;
import java.util.IdentityHashMap;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Set;

/**
 * The parameter update of a training step, once the gradients of all micro-batches are accumulated: in FP32 the
 * {@link StatefulOptimizer} updates each trainable weight in place; in FP16 (mixed precision) the gradients of the FP16
 * working weights are checked for overflow, unscaled by the {@link DynamicLossScaler}'s scale, applied to the FP32
 * masters and the masters copied back into the working weights, or the whole step is skipped and the scale lowered.
 * Either way the gradients are zeroed for the next step.
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
    private final Map<String, NDArray> masters;
    private final StatefulOptimizer optimizer;
    private DynamicLossScaler scaler;

    private ParameterUpdate(Map<String, Parameter> parameters, Map<String, NDArray> masters,
            StatefulOptimizer optimizer, DynamicLossScaler scaler) {
        this.parameters = parameters;
        this.masters = masters;
        this.optimizer = optimizer;
        this.scaler = scaler;
    }

    /** FP32 training: the optimizer updates the weights themselves. */
    static ParameterUpdate fp32(Map<String, Parameter> parameters, StatefulOptimizer optimizer) {
        return new ParameterUpdate(parameters, Map.of(), optimizer, null);
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
        return new ParameterUpdate(parameters, Collections.unmodifiableMap(masters), optimizer, scaler);
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
     * @return false if the step was skipped (an FP16 overflow; the scale is lowered)
     * @throws NonFiniteLossException if an FP32 gradient is not finite, or FP16 gradients overflow at the minimum
     *     scale (nothing is updated)
     */
    boolean apply(float scale, long step) {
        String nonFinite = firstNonFiniteGradient();
        if (scaler == null) {
            if (nonFinite != null) {
                zeroGradients();
                throw new NonFiniteLossException(step, "the gradient of " + nonFinite + " holds NaN or infinite"
                        + " values (FP32 training, so not a loss-scale overflow); nothing was updated");
            }
            updateFp32();
            return true;
        }
        float minScale = Float.parseFloat(scaler.state().get("min_scale"));
        if (nonFinite != null && scale <= minScale) {
            zeroGradients();
            throw new NonFiniteLossException(step, "the FP16 gradient of " + nonFinite + " overflows even at the"
                    + " minimum loss scale " + minScale + "; nothing was updated");
        }
        return updateFp16(scale, nonFinite == null);
    }

    private void updateFp32() {
        for (Parameter p : parameters.values()) {
            if (!p.requiresGradient()) {
                continue;
            }
            NDArray w = p.getArray();
            try (NDArray g = w.getGradient()) {
                optimizer.update(p.getId(), w, g);
            }
            JniUtils.zeroGrad((PtNDArray) w);
        }
    }

    /**
     * The FP16 update, parameter by parameter: after one pass that only looks for inf/NaN in the (scaled) gradients
     * as they are ({@link #firstNonFiniteGradient}), if there are none, for each parameter its gradient is unscaled
     * into FP32, applied to the FP32 master and the master copied into the FP16 working weight, block of rows by block
     * of rows
     * ({@link StatefulOptimizer#update(String, NDArray, NDArray, float, NDArray)}): only one block's FP32 gradient and
     * FP16 copy exist at a time. {@code MixedPrecisionOptimizer} unscales every gradient to FP32 before the check, a
     * transient copy of 4 bytes per FP16 parameter (about 1.1 GB for bench-small) that would dominate a step's memory.
     *
     * @param finite whether every gradient is finite (the result of the counting pass)
     */
    private boolean updateFp16(float scale, boolean finite) {
        if (!scaler.update(!finite)) {
            zeroGradients();
            return false;
        }
        for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
            Parameter p = e.getValue();
            if (!p.requiresGradient()) {
                continue;
            }
            NDArray w = p.getArray();
            NDArray master = masters.get(e.getKey());
            try (NDArray g = w.getGradient()) {
                // unscaled in FP32 block by block; the updated master block is copied into the FP16 working weight
                optimizer.update(p.getId(), master != null ? master : w, g, scale, master != null ? w : null);
            }
            JniUtils.zeroGrad((PtNDArray) w);
        }
        return true;
    }

    /** The name of the first trainable parameter whose gradient holds inf or NaN, or null if all are finite. */
    private String firstNonFiniteGradient() {
        for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
            Parameter p = e.getValue();
            if (!p.requiresGradient() || !(p.getArray() instanceof PtNDArray)) {
                continue;
            }
            try (NDArray g = JniUtils.getGradient((PtNDArray) p.getArray())) {
                if (g != null && !allFinite(g)) {
                    return e.getKey();
                }
            }
        }
        return null;
    }

    /** Zeroes the gradient buffers of the trainable parameters that have one. */
    void zeroGradients() {
        for (Parameter p : parameters.values()) {
            if (p.requiresGradient() && p.getArray() instanceof PtNDArray) {
                JniUtils.zeroGrad((PtNDArray) p.getArray());
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
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(true);
        try {
            for (Parameter p : parameters.values()) {
                if (!p.requiresGradient() || !(p.getArray() instanceof PtNDArray)) {
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

    /**
     * Whether every element of {@code a} is finite: its maximum and minimum are (both reductions propagate NaN), two
     * read-only passes with scalar results and no temporaries.
     */
    static boolean allFinite(NDArray a) {
        if (a.isEmpty()) {
            return true;
        }
        try (NDArray max = a.max();
                NDArray min = a.min();
                NDArray wideMax = max.toType(DataType.FLOAT32, false);
                NDArray wideMin = min.toType(DataType.FLOAT32, false)) {
            return Float.isFinite(wideMax.getFloat()) && Float.isFinite(wideMin.getFloat());
        }
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
            master.set(new NDIndex("..."), fp32);
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
        return new StateBytes(weights, masterBytes, grads, optimizer.stateBytes());
    }

    private static long bytes(NDArray a) {
        return a.size() * a.getDataType().getNumOfBytes();
    }
}
