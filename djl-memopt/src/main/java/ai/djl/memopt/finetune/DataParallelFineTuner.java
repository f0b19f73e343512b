package ai.djl.memopt.finetune;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.GradientCollector;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * Data-parallel fine-tuning over the devices of one host: one replica of the model per device, each taking {@code 1/N}
 * of every micro-batch's rows on its own thread, the gradients summed onto the first replica, one update there, and the
 * updated weights copied back to the others, so every replica takes the same step.
 *
 * <p>The first replica is a {@link FineTuner} (the <i>primary</i>): it alone holds the optimizer state, the FP32
 * masters of FP16 training and the loss scaler, so these are held once, not N times. The other replicas carry the same
 * decorations (checkpointed layers, FP16 working weights; their own FP32 copies are freed) and only compute gradients.
 * In FP16 the replicas' scaled gradients are summed before the primary's overflow check, so an overflow on any replica
 * makes the sum non-finite and every replica skips the step together, with the one scale lowered once.
 *
 * <p>DJL allows one {@link GradientCollector} in the process (a second one throws) while grad mode is per thread: as
 * DJL's own {@code EasyTrain.trainBatch} does for a {@code Trainer} with several devices, one collector is opened per
 * micro-batch and every replica thread switches grad mode on and back-propagates through it; the checkpointing
 * collector keeps its recomputation segments per thread. DJL's {@code Trainer}/{@code ParameterStore} multi-device
 * path itself does not fit: it keeps per-device copies of parameters inside the {@code ParameterStore} and updates
 * them with a DJL {@code Optimizer}, while this library's loss head and row-wise embedding write gradients into the
 * parameters themselves and the update is the {@link StatefulOptimizer} with FP16 masters.
 *
 * <pre>{@code
 * List<DeepSeekForCausalLM> replicas = List.of(DeepSeekLoader.load(dir, Device.gpu(0), DataType.FLOAT32),
 *         DeepSeekLoader.load(dir, Device.gpu(1), DataType.FLOAT32));
 * try (DataParallelFineTuner dp = DataParallelFineTuner.create(FineTuner.builder().optPrecision(Precision.FP16),
 *         replicas)) {
 *     StepResult r = dp.step(data.trainBatch(dp.primary().dataPosition(), 8)); // 4 rows per GPU
 * }
 * }</pre>
 */
public final class DataParallelFineTuner implements AutoCloseable {

    private final FineTuner primary;
    private final List<Replica> replicas; // the primary's first, then one per further device
    private final ExecutorService threads;
    /** Called on a replica's thread after its backward, with its index (tests inject an overflow there). */
    java.util.function.IntConsumer afterBackward = r -> { };

    private DataParallelFineTuner(FineTuner primary, List<Replica> replicas) {
        this.primary = primary;
        this.replicas = ImmutableList.copyOf(replicas);
        AtomicInteger id = new AtomicInteger();
        this.threads = Executors.newFixedThreadPool(replicas.size(), r -> {
            Thread t = new Thread(r, "memopt-replica-" + id.getAndIncrement());
            t.setDaemon(true);
            return t;
        });
    }

    /**
     * Builds the primary from {@code settings} on {@code models.get(0)}, and a replica on each further model, its
     * weights set to the primary's.
     *
     * @param settings every setting but the model (set here)
     * @param models one FP32 model per device, of the same configuration and parameters (loaded the same way)
     * @throws IllegalArgumentException if the models differ in configuration or parameters, naming the first difference
     */
    public static DataParallelFineTuner create(FineTuner.Builder settings, List<DeepSeekForCausalLM> models) {
        Preconditions.checkArgument(models != null && !models.isEmpty(), "data parallelism needs at least one model");
        FineTuner primary = settings.setModel(models.get(0)).build();
        if (primary.fused() != null && models.size() > 1) {
            primary.close();
            throw new IllegalArgumentException("the fused update cannot run data parallel: it updates each layer when"
                    + " its own backward ends, before the other replicas' gradients are summed in; drop"
                    + " --fused-update or use one device");
        }
        List<Replica> replicas = new ArrayList<>();
        try {
            replicas.add(new Replica(primary.model(), primary.lossHead, primary.parameters()));
            for (int r = 1; r < models.size(); r++) {
                replicas.add(Replica.of(primary, models.get(r), r));
            }
        } catch (RuntimeException e) {
            primary.close();
            throw e;
        }
        return new DataParallelFineTuner(primary, replicas);
    }

    /** The first replica's tuner: optimizer state, masters, scaler, counters, checkpoints and the saved model. */
    public FineTuner primary() {
        return primary;
    }

    /** The number of replicas. */
    public int size() {
        return replicas.size();
    }

    /** Each replica's device, in order. */
    public List<Device> devices() {
        List<Device> out = new ArrayList<>();
        replicas.forEach(r -> out.add(r.lm.manager().getDevice()));
        return List.copyOf(out);
    }

    /**
     * One optimizer step on {@code batch}: each of its {@code K} micro-batches (gradient accumulation) is split into
     * {@code N} equal shards, one per replica, with the loss of each divided by {@code K N}; the gradients equal those
     * of {@link FineTuner#step} over the same batch up to summation order.
     *
     * @throws IllegalArgumentException if the rows do not split into {@code K N} equal parts
     * @throws NonFiniteLossException if a replica's loss is not finite (nothing is updated)
     */
    public StepResult step(TokenBatch batch) {
        float lr = primary.schedule().at(primary.step());
        primary.optimizer().setLearningRate(lr);
        float scale = primary.lossScale();
        double loss = accumulate(batch, scale);
        reduce();
        StepResult r = primary.finishStep(batch, loss, scale, lr);
        if (!r.skipped()) {
            broadcast(true);
        }
        return r;
    }

    /** Forward and backward of {@code batch} over the replicas and the sum onto the primary, no update (for tests). */
    double accumulateGradients(TokenBatch batch, float lossFactor) {
        double loss = accumulate(batch, lossFactor);
        reduce();
        return loss;
    }

    private double accumulate(TokenBatch batch, float scale) {
        int n = replicas.size();
        int k = primary.gradientAccumulation();
        Preconditions.checkArgument(batch.rows() % (k * n) == 0, "a batch of %s rows does not split into %s"
                + " gradient-accumulation micro-batches of %s equal replica shards", batch.rows(), k, n);
        primary.checkIds(batch);
        int micro = batch.rows() / k;
        int shard = micro / n;
        float factor = scale / (k * n);
        double lossSum = 0;
        for (int i = 0; i < k; i++) {
            TokenBatch mb = batch.slice(i * micro, (i + 1) * micro);
            List<Future<Double>> losses = new ArrayList<>();
            try (GradientCollector gc = primary.lossHead.openCollector(primary.model().manager())) {
                for (int r = 0; r < n; r++) {
                    Replica replica = replicas.get(r);
                    TokenBatch part = mb.slice(r * shard, (r + 1) * shard);
                    int index = r;
                    losses.add(threads.submit(() -> {
                        double loss = replica.forwardBackward(part, factor, primary.rowwiseGradients, gc);
                        afterBackward.accept(index);
                        return loss;
                    }));
                }
                for (Future<Double> f : losses) {
                    lossSum += join(f) / (k * n);
                }
            } catch (RuntimeException e) {
                losses.forEach(f -> f.cancel(false));
                zeroGradients();
                throw e;
            }
            if (!Double.isFinite(lossSum)) {
                zeroGradients();
                throw new NonFiniteLossException(primary.step() + 1, "the loss is " + lossSum + " ("
                        + primary.precision() + ") on a replica: the weights, the activations or the data hold"
                        + " non-finite values; nothing was updated");
            }
        }
        return lossSum;
    }

    private static double join(Future<Double> f) {
        try {
            return f.get();
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("interrupted while replicas were computing gradients", e);
        } catch (ExecutionException e) {
            if (e.getCause() instanceof RuntimeException) {
                throw (RuntimeException) e.getCause();
            }
            throw new IllegalStateException("a replica failed: " + e.getCause(), e.getCause());
        }
    }

    /** Adds every replica's gradients into the primary's (on the primary's device) and zeroes the replicas'. */
    private void reduce() {
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(false);
        try {
            Map<String, Parameter> mine = primary.parameters();
            for (int r = 1; r < replicas.size(); r++) {
                for (Map.Entry<String, Parameter> e : replicas.get(r).parameters.entrySet()) {
                    Parameter p = e.getValue();
                    if (!p.requiresGradient()) {
                        continue;
                    }
                    PtNDArray w = (PtNDArray) p.getArray();
                    PtNDArray into = (PtNDArray) mine.get(e.getKey()).getArray();
                    try (NDManager scratch = into.getManager().newSubManager(into.getDevice())) {
                        NDArray g = JniUtils.getGradient(w);
                        if (g == null) {
                            continue;
                        }
                        g.attach(scratch);
                        NDArray sum = JniUtils.getGradient(into);
                        Preconditions.checkState(sum != null, "%s has a gradient on replica %s but none on the"
                                + " primary", e.getKey(), r);
                        sum.attach(scratch);
                        sum.addi(onto(g, scratch));
                    }
                    JniUtils.zeroGrad(w);
                }
            }
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }

    /**
     * {@code array} (a handle {@code scratch} owns) on {@code scratch}'s device, created in {@code scratch}: a
     * cross-device {@code toDevice} creates its result in a new sub-manager of the source's manager, which would
     * otherwise be a long-lived weights' manager collecting one per copy.
     */
    private static NDArray onto(NDArray array, NDManager scratch) {
        return array.toDevice(scratch.getDevice(), false);
    }

    private void zeroGradients() {
        primary.update().zeroGradients();
        for (int r = 1; r < replicas.size(); r++) {
            replicas.get(r).zeroGradients();
        }
    }

    /**
     * Copies the primary's weights into every other replica: the trainable ones ({@code trainableOnly}, after a step)
     * or all of them (after a restore).
     */
    private void broadcast(boolean trainableOnly) {
        for (int r = 1; r < replicas.size(); r++) {
            replicas.get(r).copyFrom(primary.parameters(), trainableOnly);
        }
    }

    /** {@link FineTuner#saveCheckpoint} of the primary (the replicas hold the same weights). */
    public void saveCheckpoint(Path dir) throws IOException {
        primary.saveCheckpoint(dir);
    }

    /** {@link FineTuner#restoreCheckpoint} into the primary, then its weights copied to every replica. */
    public void restoreCheckpoint(Path dir) throws IOException {
        primary.restoreCheckpoint(dir);
        copyWeightsToReplicas();
    }

    /** Copies every weight of the primary into the other replicas (after changing the primary's weights directly). */
    public void copyWeightsToReplicas() {
        broadcast(false);
    }

    /** Stops the replica threads and closes the primary's optimizer state (the models belong to the caller). */
    @Override
    public void close() {
        threads.shutdownNow();
        primary.close();
    }

    /** A model that computes gradients on its own thread: the primary's, or a copy decorated the same way. */
    private static final class Replica {
        final DeepSeekForCausalLM lm;
        final ChunkedLossHead head;
        final Map<String, Parameter> parameters;

        Replica(DeepSeekForCausalLM lm, ChunkedLossHead head, Map<String, Parameter> parameters) {
            this.lm = lm;
            this.head = head;
            this.parameters = parameters;
        }

        /** Decorates {@code lm} as the primary's model is and gives it the primary's weights. */
        static Replica of(FineTuner primary, DeepSeekForCausalLM lm, int index) {
            Preconditions.checkArgument(lm != null && lm != primary.model(), "replica %s must be a model of its own",
                    index);
            Preconditions.checkArgument(lm.config().equals(primary.model().config()),
                    "replica %s's configuration differs from the first replica's: load every replica from the same"
                            + " model", index);
            List<String> checkpointed = ActivationCheckpoints.apply(lm, primary.checkpointSpec);
            if (primary.precision() == FineTuner.Precision.FP16) {
                // FP16 working weights as on the primary; their FP32 originals are freed: the masters are held once
                for (MixedPrecisionBlock.MasterWeight w : MixedPrecisionBlock.wrap(lm).masterWeights()) {
                    if (w.parameter().getArray() != w.master()) {
                        w.master().close();
                    }
                }
            }
            Map<String, Parameter> params = ParameterUpdate.uniqueParameters(lm);
            Preconditions.checkArgument(params.keySet().equals(primary.parameters().keySet()),
                    "replica %s's parameters differ from the first replica's (%s vs %s parameters): load and decorate"
                            + " every replica the same way", index, params.size(), primary.parameters().size());
            Replica replica = new Replica(lm, new ChunkedLossHead(lm, primary.lossChunkTokens,
                    !checkpointed.isEmpty()), params);
            replica.copyFrom(primary.parameters(), false);
            return replica;
        }

        double forwardBackward(TokenBatch shard, float factor, boolean rowwise, GradientCollector gc) {
            boolean gradMode = JniUtils.isGradMode();
            JniUtils.setGradMode(true); // per thread: the collector switched it on only on the thread that opened it
            try {
                try (NDManager losses = lm.manager().newSubManager()) {
                    return head.forwardBackward(shard, factor, rowwise, losses, gc).getFloat();
                }
            } finally {
                JniUtils.setGradMode(gradMode);
            }
        }

        void copyFrom(Map<String, Parameter> source, boolean trainableOnly) {
            boolean gradMode = JniUtils.isGradMode();
            JniUtils.setGradMode(false); // in-place writes into leaves that require grad
            try {
                for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
                    Parameter p = e.getValue();
                    if (trainableOnly && !p.requiresGradient()) {
                        continue;
                    }
                    NDArray to = p.getArray();
                    NDArray from = source.get(e.getKey()).getArray();
                    Preconditions.checkArgument(from.getShape().equals(to.getShape())
                                    && from.getDataType() == to.getDataType(),
                            "%s is %s %s on the first replica, %s %s here", e.getKey(), from.getDataType(),
                            from.getShape(), to.getDataType(), to.getShape());
                    try (NDManager scratch = to.getManager().newSubManager(to.getDevice())) {
                        NDArray view = from.get(new NDIndex("...")); // a handle of its own, sharing the storage
                        view.attach(scratch);
                        to.set(new NDIndex("..."), onto(view, scratch));
                    }
                }
            } finally {
                JniUtils.setGradMode(gradMode);
            }
        }

        void zeroGradients() {
            for (Parameter p : parameters.values()) {
                if (p.requiresGradient() && p.getArray() instanceof PtNDArray) {
                    JniUtils.zeroGrad((PtNDArray) p.getArray());
                }
            }
        }
    }
}
