package ai.djl.memopt.finetune;

/** Bytes of the training state, summed from the arrays themselves. Immutable. */
public final class StateBytes {

    private final long weights;
    private final long masters;
    private final long gradients;
    private final long optimizer;
    private final long host;

    StateBytes(long weights, long masters, long gradients, long optimizer, long host) {
        this.weights = weights;
        this.masters = masters;
        this.gradients = gradients;
        this.optimizer = optimizer;
        this.host = host;
    }

    /** The model's parameter arrays (FP16 working copies in mixed precision). */
    public long weights() {
        return weights;
    }

    /** FP32 master weights (mixed precision only). */
    public long masters() {
        return masters;
    }

    /** Gradient buffers that exist (PyTorch allocates them at the first backward). */
    public long gradients() {
        return gradients;
    }

    /** Optimizer moments (allocated at the first update). */
    public long optimizer() {
        return optimizer;
    }

    /**
     * The part kept on the host: FP32 masters and optimizer state when the optimizer is offloaded
     * ({@link FineTuner.Builder#optOffloadOptimizer}), else 0. Counted by role, so on the CPU, where host and device
     * are one memory, it still says what a GPU run would keep off the device.
     */
    public long hostBytes() {
        return host;
    }

    /** The part on the model's device: {@link #total} minus {@link #hostBytes}. */
    public long deviceBytes() {
        return total() - host;
    }

    public long total() {
        return weights + masters + gradients + optimizer;
    }

    @Override
    public String toString() {
        return "weights " + weights + ", masters " + masters + ", gradients " + gradients + ", optimizer " + optimizer
                + " (host " + host + ")";
    }
}
