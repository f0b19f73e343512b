package ai.djl.memopt.lora;

import com.google.common.collect.ImmutableList;
import java.util.List;

/** What {@link Lora#apply} or {@link Lora#load} did: the adapted module paths and the parameter counts after it. */
public final class LoraReport {

    private final ImmutableList<String> wrappedPaths;
    private final long trainableParameters;
    private final long totalParameters;

    LoraReport(List<String> wrappedPaths, long trainableParameters, long totalParameters) {
        this.wrappedPaths = ImmutableList.copyOf(wrappedPaths);
        this.trainableParameters = trainableParameters;
        this.totalParameters = totalParameters;
    }

    /** Dotted paths of the modules that now carry an adapter, in model order. */
    public List<String> wrappedPaths() {
        return wrappedPaths;
    }

    /** Elements of all parameters that receive gradients (the adapters' {@code lora_A} and {@code lora_B}). */
    public long trainableParameters() {
        return trainableParameters;
    }

    /**
     * Elements of all initialized {@code Parameter}s of the model, adapters included, plus the weights a quantized
     * projection holds packed ({@code out x in} each, as PEFT counts a 4-bit base: weights, not bytes), so on a QLoRA
     * model the fraction is of the whole model, as for plain LoRA.
     */
    public long totalParameters() {
        return totalParameters;
    }

    /** {@code trainableParameters / totalParameters}, as PEFT's {@code print_trainable_parameters} shows. */
    public double trainableFraction() {
        return totalParameters == 0 ? 0 : (double) trainableParameters / totalParameters;
    }

    @Override
    public String toString() {
        return String.format(java.util.Locale.ROOT, "LoRA on %d modules: trainable params %,d of %,d (%.4f%%)",
                wrappedPaths.size(), trainableParameters, totalParameters, 100 * trainableFraction());
    }
}
