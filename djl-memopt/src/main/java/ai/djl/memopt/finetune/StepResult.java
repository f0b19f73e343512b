package ai.djl.memopt.finetune;

import java.util.Locale;

/**
 * What one {@link FineTuner#step} did.
 *
 * @param step the number of optimizer steps taken so far, this one included (1 after the first step)
 * @param loss mean next-token cross-entropy of the batch (nats), before the update; averaged over the micro-batches
 * @param lossScale the loss scale this step's backward used (1 in FP32)
 * @param skipped true if an FP16 overflow (inf/NaN gradients) skipped the update
 * @param tokens tokens in the batch
 * @param learningRate the learning rate of this step
 */
public record StepResult(long step, double loss, float lossScale, boolean skipped, long tokens, float learningRate) {

    @Override
    public String toString() {
        return String.format(Locale.ROOT, "step %d: loss %.4f, scale %s, lr %.3g%s", step, loss, lossScale,
                learningRate, skipped ? " (skipped)" : "");
    }
}
