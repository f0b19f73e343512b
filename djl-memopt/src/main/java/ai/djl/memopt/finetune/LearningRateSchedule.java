package ai.djl.memopt.finetune;

import com.google.common.base.Preconditions;

/**
 * Learning rate by optimizer step: linear warmup from {@code lr / warmup} to {@code lr} over the first {@code warmup}
 * steps, then constant, or a cosine decay to {@code lr * minRatio} at step {@code total} (as transformers'
 * {@code get_cosine_schedule_with_warmup} with a floor). Immutable.
 */
public final class LearningRateSchedule {

    private final float lr;
    private final int warmup;
    private final long total;
    private final float minRatio;

    private LearningRateSchedule(float lr, int warmup, long total, float minRatio) {
        this.lr = lr;
        this.warmup = warmup;
        this.total = total;
        this.minRatio = minRatio;
    }

    /** A constant learning rate. */
    public static LearningRateSchedule constant(float lr) {
        return of(lr, 0, 0, 1f);
    }

    /**
     * @param lr the peak learning rate
     * @param warmup linear warmup steps (0 = none)
     * @param total cosine decay ends at this step (0 = no decay: constant after warmup)
     * @param minRatio the floor as a fraction of {@code lr}
     */
    public static LearningRateSchedule of(float lr, int warmup, long total, float minRatio) {
        Preconditions.checkArgument(lr >= 0 && Float.isFinite(lr), "learning rate must be finite and >= 0, got %s",
                lr);
        Preconditions.checkArgument(warmup >= 0, "warmup steps must be >= 0, got %s", warmup);
        Preconditions.checkArgument(total == 0 || total > warmup,
                "cosine decay length (%s steps) must exceed the warmup (%s steps)", total, warmup);
        Preconditions.checkArgument(minRatio >= 0 && minRatio <= 1, "min ratio must be in [0, 1], got %s", minRatio);
        return new LearningRateSchedule(lr, warmup, total, minRatio);
    }

    /** The learning rate of optimizer step {@code step} (0-based). */
    public float at(long step) {
        if (step < warmup) {
            return lr * (step + 1) / warmup;
        }
        if (total == 0) {
            return lr;
        }
        double progress = Math.min(1.0, (double) (step - warmup) / (total - warmup));
        double cos = 0.5 * (1 + Math.cos(Math.PI * progress));
        return (float) (lr * (minRatio + (1 - minRatio) * cos));
    }

    public float peak() {
        return lr;
    }

    public int warmup() {
        return warmup;
    }

    public long total() {
        return total;
    }

    public float minRatio() {
        return minRatio;
    }

    @Override
    public String toString() {
        return "lr " + lr + (warmup > 0 ? ", warmup " + warmup : "") + (total > 0 ? ", cosine to step " + total
                + " (floor x" + minRatio + ")" : "");
    }
}
