package ai.djl.memopt.finetune;

/**
 * Bytes of the training state, summed from the arrays themselves.
 *
 * @param weights the model's parameter arrays (FP16 working copies in mixed precision)
 * @param masters FP32 master weights (mixed precision only)
 * @param gradients gradient buffers that exist (PyTorch allocates them at the first backward)
 * @param optimizer optimizer moments (allocated at the first update)
 * @param hostBytes the part kept on the host: FP32 masters and optimizer state when the optimizer is offloaded
 *     ({@link FineTuner.Builder#optOffloadOptimizer}), else 0. Counted by role, so on the CPU, where host and device
 *     are one memory, it still says what a GPU run would keep off the device.
 */
public record StateBytes(long weights, long masters, long gradients, long optimizer, long hostBytes) {

    /** The part on the model's device: {@link #total} minus {@link #hostBytes}. */
    public long deviceBytes() {
        return total() - hostBytes;
    }

    /** All of it: weights, masters, gradients and optimizer state. */
    public long total() {
        return weights + masters + gradients + optimizer;
    }

    @Override
    public String toString() {
        return "weights " + weights + ", masters " + masters + ", gradients " + gradients + ", optimizer " + optimizer
                + " (host " + hostBytes + ")";
    }
}
