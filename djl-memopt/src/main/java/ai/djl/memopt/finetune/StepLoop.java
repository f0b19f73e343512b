package ai.djl.memopt.finetune;

import ai.djl.memopt.memory.NativeMemory;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import com.google.common.base.Preconditions;

/**
 * The loop of {@link FineTuner#step}: splits a batch into the gradient-accumulation micro-batches, runs forward and
 * backward on each through the {@link ChunkedLossHead} (or hands the one micro-batch to the {@link FusedUpdate}), has
 * the {@link ParameterUpdate} apply the summed gradients, and counts the steps taken and the rows consumed, which
 * checkpoints record and restore.
 */
final class StepLoop {

    private final FineTuner tuner; // its test switch and counters of the row-wise gradient paths
    private final DeepSeekForCausalLM lm;
    private final ChunkedLossHead lossHead;
    private final ParameterUpdate update;
    private final StatefulOptimizer optimizer;
    private final LearningRateSchedule schedule;
    private final int gradientAccumulation;
    private final boolean releaseFreedMemory;
    final FusedUpdate fused; // null unless the update is fused into the backward
    /** Optimizer steps taken and training rows consumed (restored from a checkpoint). */
    long step;
    long dataPosition;

    /**
     * A loop over the collaborators {@code tuner} has built (its loss head, update, optimizer and schedule), with the
     * update fused into the backward if {@code fusedUpdate}.
     */
    StepLoop(FineTuner tuner, boolean releaseFreedMemory, boolean fusedUpdate) {
        this.tuner = tuner;
        this.lm = tuner.model();
        this.lossHead = tuner.lossHead;
        this.update = tuner.update();
        this.optimizer = tuner.optimizer();
        this.schedule = tuner.schedule();
        this.gradientAccumulation = tuner.gradientAccumulation();
        this.releaseFreedMemory = releaseFreedMemory;
        this.fused = fusedUpdate ? new FusedUpdate(lm, tuner.parameters(), update) : null;
        if (fused != null) {
            lossHead.segmentListener = fused;
        }
    }

    /** See {@link FineTuner#step(TokenBatch)}. */
    StepResult step(TokenBatch batch) {
        int k = gradientAccumulation;
        Preconditions.checkArgument(batch.rows() % k == 0,
                "a batch of %s rows does not split into %s gradient-accumulation micro-batches", batch.rows(), k);
        tuner.checkIds(batch);
        float lr = schedule.at(step);
        optimizer.setLearningRate(lr);
        float scale = update.lossScale();
        int micro = batch.rows() / k;
        double lossSum;
        try (NDManager losses = lm.manager().newSubManager()) {
            NDArray sum = null; // the micro-batches' mean losses, summed on the device
            boolean skipped = false;
            if (fused != null) { // one micro-batch (checked by the builder), updated during its backward
                fused.embeddingByAutograd = !tuner.rowwiseGradients;
                lossHead.embeddingBufferOnDemand = fused.embeddingBufferOnDemand();
                sum = fused.step(step + 1, scale, (factor, m) -> forwardBackward(batch, factor, m), losses);
                skipped = fused.skipped;
            }
            for (int i = 0; fused == null && i < k; i++) {
                NDArray loss = forwardBackward(batch.slice(i * micro, (i + 1) * micro), scale / k, losses);
                if (sum == null) {
                    sum = loss;
                } else {
                    sum.addi(loss);
                }
            }
            // checked with the gradients before the update, read once the update is queued (a GPU waits for its queue)
            if (fused == null) {
                skipped = !update.apply(scale, step + 1, sum);
            }
            lossSum = sum.getFloat();
            return countStep(batch, lossSum / k, scale, skipped, lr);
        }
    }

    /** See {@link FineTuner#finishStep}. */
    StepResult finishStep(TokenBatch batch, double loss, float scale, float lr) {
        boolean skipped;
        try (NDManager m = lm.manager().newSubManager()) {
            skipped = !update.apply(scale, step + 1, m.create((float) loss));
        }
        return countStep(batch, loss, scale, skipped, lr);
    }

    private StepResult countStep(TokenBatch batch, double loss, float scale, boolean skipped, float lr) {
        if (releaseFreedMemory && !lm.manager().getDevice().isGpu()) {
            NativeMemory.releaseFreed();
        }
        step++;
        dataPosition += batch.rows();
        return new StepResult(step, loss, scale, skipped, batch.tokens(), lr);
    }

    /** Forward and backward of a whole batch with the loss times {@code lossFactor}, no update (for tests). */
    double accumulateGradients(TokenBatch batch, float lossFactor) {
        tuner.checkIds(batch);
        try (NDManager losses = lm.manager().newSubManager()) {
            return forwardBackward(batch, lossFactor, losses).getFloat();
        }
    }

    /**
     * Forward and backward of one micro-batch; returns its mean loss, a device scalar attached to {@code losses}.
     * Gradients accumulate into the parameters.
     */
    private NDArray forwardBackward(TokenBatch micro, float lossFactor, NDManager losses) {
        NDArray loss = lossHead.forwardBackward(micro, lossFactor, tuner.rowwiseGradients, losses);
        tuner.rowwiseEmbeddings = lossHead.rowwiseEmbeddings;
        tuner.manualHeadChunks = lossHead.manualChunks;
        return loss;
    }
}
