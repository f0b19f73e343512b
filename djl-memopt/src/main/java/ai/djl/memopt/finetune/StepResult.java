package ai.djl.memopt.finetune;

import java.util.Locale;

/** What one {@link FineTuner#step} did. Immutable. */
public final class StepResult {

    private final long step;
    private final double loss;
    private final float lossScale;
    private final boolean skipped;
    private final long tokens;
    private final float learningRate;

    StepResult(long step, double loss, float lossScale, boolean skipped, long tokens, float learningRate) {
        this.step = step;
        this.loss = loss;
        this.lossScale = lossScale;
        this.skipped = skipped;
        this.tokens = tokens;
        this.learningRate = learningRate;
    }

    /** The number of optimizer steps taken so far, this one included (1 after the first step). */
    public long step() {
        return step;
    }

    /** Mean next-token cross-entropy of the batch (nats), before the update; averaged over the micro-batches. */
    public double loss() {
        return loss;
    }

    /** The loss scale this step's backward used (1 in FP32). */
    public float lossScale() {
        return lossScale;
    }

    /** True if an FP16 overflow (inf/NaN gradients) skipped the update. */
    public boolean skipped() {
        return skipped;
    }

    /** Tokens in the batch. */
    public long tokens() {
        return tokens;
    }

    /** The learning rate of this step. */
    public float learningRate() {
        return learningRate;
    }

    @Override
    public String toString() {
        return String.format(Locale.ROOT, "step %d: loss %.4f, scale %s, lr %.3g%s", step, loss, lossScale,
                learningRate, skipped ? " (skipped)" : "");
    }
}
