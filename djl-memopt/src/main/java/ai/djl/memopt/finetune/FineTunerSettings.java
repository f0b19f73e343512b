package ai.djl.memopt.finetune;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import com.google.common.base.Preconditions;
import java.util.Map;

/**
 * The settings a {@link FineTuner.Builder} collects, with their defaults, the checks {@link FineTuner.Builder#build}
 * makes of them together, and what follows from them alone: the learning-rate schedule and the kind of
 * {@link ParameterUpdate}.
 */
final class FineTunerSettings {

    DeepSeekForCausalLM model;
    ActivationCheckpoints.Spec checkpoints = ActivationCheckpoints.Spec.NONE;
    FineTuner.Precision precision = FineTuner.Precision.FP32;
    // kind, betas, epsilon, weight decay and momentum, with the optimizer's own defaults and validation
    final StatefulOptimizer.Builder optimizerSettings = StatefulOptimizer.builder();
    float learningRate = 1e-4f;
    LearningRateSchedule schedule;
    int gradientAccumulation = 1;
    int lossChunkTokens = Integer.MAX_VALUE;
    DynamicLossScaler lossScaler;
    long seed;
    boolean releaseFreedMemory = true;
    Map<String, String> runIdentity = Map.of();
    boolean fusedUpdate;
    boolean offloadOptimizer;

    /**
     * Checks the settings together.
     *
     * @throws IllegalArgumentException naming the bad value
     */
    void validate() {
        Preconditions.checkArgument(model != null, "FineTuner needs a model: call setModel");
        Preconditions.checkArgument(model.manager() != null, "the model has no weights: load or initialise it");
        Preconditions.checkArgument(model.dataType() == DataType.FLOAT32,
                "the model's weights are %s: load it in FLOAT32 (FP16 training keeps FP32 masters and makes its"
                        + " own FP16 copies)", model.dataType());
        Preconditions.checkArgument(gradientAccumulation >= 1, "gradient accumulation must be >= 1, got %s",
                gradientAccumulation);
        Preconditions.checkArgument(learningRate >= 0 && Float.isFinite(learningRate),
                "learning rate must be finite and >= 0, got %s", learningRate);
        Preconditions.checkArgument(lossChunkTokens >= 1, "loss chunk must be >= 1 token, got %s",
                lossChunkTokens);
        Preconditions.checkArgument(!fusedUpdate || gradientAccumulation == 1,
                "the fused update (--fused-update) applies each gradient as soon as it is complete, so it cannot"
                        + " sum gradients over %s micro-batches (--grad-accum %s): use --grad-accum 1 or drop"
                        + " --fused-update", gradientAccumulation, gradientAccumulation);
        Preconditions.checkArgument(lossScaler == null || precision == FineTuner.Precision.FP16,
                "a loss scaler is only used in FP16 training");
    }

    /** The schedule given, else the constant learning rate. */
    LearningRateSchedule schedule() {
        return schedule != null ? schedule : LearningRateSchedule.constant(learningRate);
    }

    /** The FP32 or FP16 update (with the loss scaler given, else a new dynamic one), offloaded to the host if asked. */
    ParameterUpdate newUpdate(Map<String, Parameter> parameters, StatefulOptimizer optimizer) {
        ParameterUpdate update = precision == FineTuner.Precision.FP16
                ? ParameterUpdate.fp16(model, parameters, optimizer,
                        lossScaler != null ? lossScaler : DynamicLossScaler.create())
                : ParameterUpdate.fp32(parameters, optimizer);
        if (offloadOptimizer) {
            update.offload(Device.cpu());
        }
        return update;
    }
}
