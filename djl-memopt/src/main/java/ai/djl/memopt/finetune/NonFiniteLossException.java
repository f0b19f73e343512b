package ai.djl.memopt.finetune;

/**
 * A training step whose loss or gradients are not finite for a reason loss scaling does not explain: the loss itself
 * is NaN or infinite (in FP32 or FP16), a gradient is in FP32 training, or FP16 gradients overflow even at the
 * minimum loss scale. The step is not applied: the weights and optimizer state are those before it, and the gradients
 * are zeroed. (An FP16 overflow at a higher scale is no error: the step is skipped and the scale lowered.)
 */
public final class NonFiniteLossException extends IllegalStateException {

    private static final long serialVersionUID = 1L;

    private final long step;

    NonFiniteLossException(long step, String message) {
        super("step " + step + ": " + message);
        this.step = step;
    }

    /** The step (1-based) that failed. */
    public long step() {
        return step;
    }
}
