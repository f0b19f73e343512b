package ai.djl.memopt.finetune;

/** Bytes of the training state, summed from the arrays themselves. Immutable. */
public final class StateBytes {

    private final long weights;
    private final long masters;
    private final long gradients;
    private final long optimizer;

    StateBytes(long weights, long masters, long gradients, long optimizer) {
        this.weights = weights;
        this.masters = masters;
        this.gradients = gradients;
        this.optimizer = optimizer;
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

    public long total() {
        return weights + masters + gradients + optimizer;
    }

    @Override
    public String toString() {
        return "weights " + weights + ", masters " + masters + ", gradients " + gradients + ", optimizer " + optimizer;
    }
}
