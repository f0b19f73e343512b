package ai.djl.memopt.finetune;

import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.memory.NativeMemory;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.nn.Parameter;
import com.google.common.base.Preconditions;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Locale;
import java.util.Map;

/**
 * Fine-tunes a {@link DeepSeekForCausalLM} on token batches with the memory features of this library: activation
 * checkpointing of the decoder layers ({@code ai.djl.memopt.checkpoint}), FP16 mixed precision with FP32 masters and
 * dynamic loss scaling ({@code ai.djl.memopt.precision}), gradient accumulation, and a {@link StatefulOptimizer}
 * (Adam/AdamW/SGD) whose state goes into training checkpoints.
 *
 * <p>One {@link #step(TokenBatch)} takes a batch of {@code (rows, seq)} tokens, splits it into {@code K} micro-batches
 * of {@code rows / K} rows (memory is that of one micro-batch), runs forward and backward on each with the loss
 * divided by {@code K} (times the loss scale in FP16), then applies one optimizer update. Every array a step creates
 * is closed before it returns, and on CPU the memory the C allocator kept from them is given back to the system
 * ({@link NativeMemory#releaseFreed()}; {@link Builder#optReleaseFreedMemory}).
 *
 * <p>The step is a loop ({@link StepLoop}); the work is done by {@link ChunkedLossHead} (the loss head, its chunks
 * differentiated by hand), {@link ParameterUpdate} (the FP32 or FP16 update with the loss scaler) and
 * {@link TrainingCheckpoints} (directories that {@link #saveCheckpoint} writes whole, with checksums and the
 * {@link #runIdentity}, and {@link #restoreCheckpoint} verifies and puts back, so that N steps, save, restore, M steps
 * gives the weights of N + M uninterrupted steps, bit for bit). A non-finite loss is a {@link NonFiniteLossException},
 * never an update.
 *
 * <pre>{@code
 * DeepSeekForCausalLM lm = DeepSeekLoader.load(modelDir, Device.cpu(), DataType.FLOAT32);
 * try (FineTuner tuner = FineTuner.builder().setModel(lm)
 *         .optCheckpointing(CheckpointPolicy.all()).optPrecision(FineTuner.Precision.FP16)
 *         .optOptimizer(StatefulOptimizer.Kind.ADAMW).optLearningRate(1e-4f).optGradientAccumulation(2).build()) {
 *     StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 8));   // (8, T): two micro-batches of 4
 * }
 * }</pre>
 */
public final class FineTuner implements AutoCloseable {

    /** Training precision. */
    public enum Precision {
        FP32,
        FP16;

        /** Parses {@code fp32} or {@code fp16} (any case). */
        public static Precision parse(String name) {
            switch (name.trim().toLowerCase(Locale.ROOT)) {
                case "fp32":
                case "float32":
                    return FP32;
                case "fp16":
                case "float16":
                    return FP16;
                case "bf16":
                case "bfloat16":
                    throw new IllegalArgumentException(
                            "precision bf16 is not supported: DJL 0.36's PyTorch engine aborts the JVM on BFLOAT16;"
                                    + " use fp16");
                default:
                    throw new IllegalArgumentException("unknown precision '" + name + "': expected fp32 or fp16");
            }
        }
    }

    private final DeepSeekForCausalLM lm;
    private final StatefulOptimizer optimizer;
    private final ParameterUpdate update;
    final ChunkedLossHead lossHead;
    final ActivationCheckpoints.Spec checkpointSpec; // and the loss chunk: what a data-parallel replica repeats
    final int lossChunkTokens;
    private final NDManager stateManager;
    private final LearningRateSchedule schedule;
    private final int gradientAccumulation;
    private final String checkpointing;
    private final List<String> checkpointedLayers;
    private final Precision precision;
    private final Map<String, Parameter> parameters;
    private final long seed;
    private final RunIdentity identity;
    private final StepLoop loop;
    private boolean closed;
    /** Row-wise embedding gradient and hand-differentiated head chunks (off only in tests, to compare with autograd). */
    boolean rowwiseGradients = true;
    /** Micro-batches whose embedding gradient went row by row, and head chunks differentiated by hand (for tests). */
    long rowwiseEmbeddings;
    long manualHeadChunks;

    private FineTuner(FineTunerSettings s) {
        this.lm = s.model;
        this.precision = s.precision;
        this.gradientAccumulation = s.gradientAccumulation;
        this.seed = s.seed;
        this.schedule = s.schedule();
        this.checkpointedLayers = ActivationCheckpoints.apply(lm, s.checkpoints);
        this.checkpointing = s.checkpoints.name();
        this.checkpointSpec = s.checkpoints;
        this.lossChunkTokens = s.lossChunkTokens;
        this.lossHead = new ChunkedLossHead(lm, s.lossChunkTokens, !checkpointedLayers.isEmpty());
        this.parameters = ParameterUpdate.uniqueParameters(lm);
        this.stateManager = lm.manager().newSubManager();
        this.optimizer = s.optimizerSettings.setManager(stateManager).optLearningRate(schedule.at(0)).build();
        this.update = s.newUpdate(parameters, optimizer);
        this.loop = new StepLoop(this, s.releaseFreedMemory, s.fusedUpdate);
        this.identity = TrainingCheckpoints.runIdentity(this).with(s.runIdentity);
    }

    public static Builder builder() {
        return new Builder();
    }

    /**
     * A checkpoint policy for the decoder layers by name: {@code none} (null), {@code all}, {@code every:N} (layers 0,
     * N, 2N, ...), {@code sqrt} (every {@code ceil(sqrt(L))}-th layer), or {@code nested} and {@code nested+experts}
     * ({@code all}, and {@link Builder#optCheckpointing(String)} then also checkpoints each layer's attention and MLP,
     * and with {@code +experts} each routed expert, recomputed one at a time during the layer's backward).
     *
     * @throws IllegalArgumentException naming the bad value
     */
    public static CheckpointPolicy checkpointPolicy(String spec) {
        return ActivationCheckpoints.policy(spec);
    }

    /** The model being trained (decorated in place: checkpointed layers, FP16 working weights in mixed precision). */
    public DeepSeekForCausalLM model() {
        return lm;
    }

    public Precision precision() {
        return precision;
    }

    /** The checkpointing spec this tuner was built with ({@code none}, {@code all}, ...). */
    public String checkpointing() {
        return checkpointing;
    }

    /** Names of the checkpointed decoder layers ({@code "0"}, {@code "1"}, ...). */
    public List<String> checkpointedLayers() {
        return checkpointedLayers;
    }

    public int gradientAccumulation() {
        return gradientAccumulation;
    }

    public StatefulOptimizer optimizer() {
        return optimizer;
    }

    public LearningRateSchedule schedule() {
        return schedule;
    }

    /** Optimizer steps taken (restored from a checkpoint). */
    public long step() {
        return loop.step;
    }

    /** Training rows consumed: the position of the next batch in {@link TokenDataset#trainBatch}. */
    public long dataPosition() {
        return loop.dataPosition;
    }

    public long seed() {
        return seed;
    }

    /**
     * The identity of this run, recorded in its checkpoints: the model's configuration and trainable parameters,
     * precision, optimizer, schedule, gradient accumulation and seed, and what {@link Builder#optRunIdentity} adds.
     */
    public RunIdentity runIdentity() {
        return identity;
    }

    /** The loss scale the next step will use (1 in FP32). */
    public float lossScale() {
        return update.lossScale();
    }

    /** The loss scaler (FP16) or null. */
    public DynamicLossScaler lossScaler() {
        return update.scaler();
    }

    /** The model's parameters by Hugging Face name, each once (for the collaborators). */
    Map<String, Parameter> parameters() {
        return parameters;
    }

    ParameterUpdate update() {
        return update;
    }

    /** Whether the optimizer update is fused into the backward ({@link Builder#optFusedUpdate}). */
    public boolean fusedUpdate() {
        return loop.fused != null;
    }

    /** Whether FP32 masters and optimizer state live on the host ({@link Builder#optOffloadOptimizer}). */
    public boolean offloadedOptimizer() {
        return update.offloaded();
    }

    /** The fused update, or null (for tests). */
    FusedUpdate fused() {
        return loop.fused;
    }

    /**
     * One optimizer step on {@code batch} (see the class documentation).
     *
     * @throws IllegalArgumentException if the rows do not split into the accumulation steps or an id is outside the
     *     vocabulary
     * @throws NonFiniteLossException if the loss is not finite, or an FP32 gradient (nothing is updated)
     */
    public StepResult step(TokenBatch batch) {
        Preconditions.checkState(!closed, "the FineTuner is closed");
        return loop.step(batch);
    }

    /**
     * The update once the gradients of {@code batch} are in this tuner's parameters, summed there by a data-parallel
     * coordinator that has checked the (host) loss; counts the step.
     */
    StepResult finishStep(TokenBatch batch, double loss, float scale, float lr) {
        return loop.finishStep(batch, loss, scale, lr);
    }

    /** Forward and backward of a whole batch with the loss times {@code lossFactor}, no update (for tests). */
    double accumulateGradients(TokenBatch batch, float lossFactor) {
        return loop.accumulateGradients(batch, lossFactor);
    }

    /**
     * Switches the GPU forms of the step on or off (for tests, to compare them with the CPU forms on the CPU): the
     * head's weight gradient in one product ({@link ChunkedLossHead}), the check of loss and gradients in one read and
     * the bucketed optimizer update ({@link ParameterUpdate}). On by default on a GPU.
     */
    void setGpuForms(boolean gpu) {
        lossHead.gpuForms = gpu;
        update.gpuForms = gpu;
    }

    void checkIds(TokenBatch batch) {
        long max = batch.maxId();
        Preconditions.checkArgument(max < lm.config().vocabSize(),
                "token id %s is outside the model's vocabulary of %s (does the tokenizer belong to this model?)", max,
                lm.config().vocabSize());
    }

    /** Mean next-token loss of a batch without gradients (held-out evaluation); closes what it creates. */
    public double evaluate(TokenBatch batch) {
        checkIds(batch);
        return lossHead.evaluate(batch);
    }

    /** Bytes of weights, FP32 masters, existing gradients and optimizer state, from the arrays. */
    public StateBytes stateBytes() {
        return update.stateBytes();
    }

    /**
     * The FP32 masters of the trainable weights in FP16 mode, by Hugging Face name (empty in FP32 mode). Frozen weights
     * have none: they never change, so their FP16 working copy is all that is kept.
     */
    public Map<String, NDArray> masterWeights() {
        return update.masters();
    }

    /**
     * Writes {@code config.json} and {@code model.safetensors} (FP32 weights, Hugging Face names) into {@code dir},
     * each file atomically; with a tokenizer copied next to them it is a model directory {@code DeepSeekLoader} and
     * transformers load.
     */
    public void saveModel(Path dir) throws IOException {
        Files.createDirectories(dir);
        TrainingCheckpoints.writeWeights(dir.resolve("model.safetensors"), update.fp32Weights());
        AtomicFiles.writeString(dir.resolve("config.json"), lm.config().toJson() + "\n");
    }

    /**
     * Saves a training checkpoint as the directory {@code dir} (see the class documentation): everything is written into
     * a temporary sibling directory first, which is then renamed to {@code dir} (replacing an older one of that name).
     */
    public void saveCheckpoint(Path dir) throws IOException {
        Preconditions.checkState(!closed, "the FineTuner is closed");
        TrainingCheckpoints.save(this, dir);
    }

    /** Whether {@code dir} looks like a training checkpoint written by {@link #saveCheckpoint}. */
    public static boolean isCheckpoint(Path dir) {
        return TrainingCheckpoints.isCheckpoint(dir);
    }

    /**
     * Restores weights, FP32 masters, optimizer state, loss scaler, step counter and data position from a checkpoint
     * that {@link #saveCheckpoint} wrote for a run of the same {@linkplain #runIdentity identity}, after checking every
     * file against the checkpoint's checksums.
     *
     * @throws IllegalArgumentException naming the file and field that does not match, or what differs between the runs
     * @throws IOException if a file is missing or corrupt (a checksum differs)
     */
    public void restoreCheckpoint(Path dir) throws IOException {
        Preconditions.checkState(!closed, "the FineTuner is closed");
        TrainingCheckpoints.Progress progress = TrainingCheckpoints.restore(this, dir);
        loop.step = progress.step();
        loop.dataPosition = progress.dataPosition();
    }

    /**
     * The newest training checkpoint (highest step) among {@code dir}'s children, of any run, or {@code dir} itself if
     * it is one; checkpoint writes a crash interrupted in {@code dir} are finished or rolled back first.
     */
    public static Path latestCheckpoint(Path dir) throws IOException {
        return CheckpointDirectory.latest(dir);
    }

    /** The step recorded in a checkpoint's {@code trainer_state.json}. */
    public static long readStep(Path checkpoint) throws IOException {
        return TrainingCheckpoints.readStep(checkpoint);
    }

    /** Frees the optimizer state (the model, and its FP32 masters, belong to the caller). */
    @Override
    public void close() {
        if (!closed) {
            closed = true;
            optimizer.close();
            stateManager.close();
        }
    }

    /** Builder: {@code setModel} required. */
    public static final class Builder {
        private final FineTunerSettings s = new FineTunerSettings();

        private Builder() {}

        /** The model, with FP32 weights (in FP16 mode they become the masters of FP16 working copies). */
        public Builder setModel(DeepSeekForCausalLM model) {
            s.model = model;
            return this;
        }

        /** Checkpoints {@code model.layers} with {@code policy} (null: no checkpointing). */
        public Builder optCheckpointing(CheckpointPolicy policy) {
            return optCheckpointing(policy, policy == null ? "none" : "custom");
        }

        /** As {@link #optCheckpointing(CheckpointPolicy)} with a name recorded in checkpoints. */
        public Builder optCheckpointing(CheckpointPolicy policy, String name) {
            s.checkpoints = new ActivationCheckpoints.Spec(policy, name, false, false);
            return this;
        }

        /**
         * {@code none}, {@code all}, {@code nested}, {@code nested+experts}, {@code every:N} or {@code sqrt}; see
         * {@link FineTuner#checkpointPolicy}.
         */
        public Builder optCheckpointing(String spec) {
            s.checkpoints = ActivationCheckpoints.Spec.parse(spec);
            return this;
        }

        public Builder optPrecision(Precision precision) {
            s.precision = Preconditions.checkNotNull(precision, "precision");
            return this;
        }

        public Builder optOptimizer(StatefulOptimizer.Kind kind) {
            s.optimizerSettings.optKind(kind);
            return this;
        }

        /** A constant learning rate (ignored when {@link #optSchedule} is given). */
        public Builder optLearningRate(float lr) {
            s.learningRate = lr;
            return this;
        }

        public Builder optSchedule(LearningRateSchedule schedule) {
            s.schedule = schedule;
            return this;
        }

        public Builder optBetas(float beta1, float beta2) {
            s.optimizerSettings.optBetas(beta1, beta2);
            return this;
        }

        public Builder optEpsilon(float epsilon) {
            s.optimizerSettings.optEpsilon(epsilon);
            return this;
        }

        /** See {@link StatefulOptimizer.Builder#optWeightDecay}. */
        public Builder optWeightDecay(float weightDecay) {
            s.optimizerSettings.optWeightDecay(weightDecay);
            return this;
        }

        /** SGD momentum. */
        public Builder optMomentum(float momentum) {
            s.optimizerSettings.optMomentum(momentum);
            return this;
        }

        /** Micro-batches per optimizer step (each batch's rows are split into this many). */
        public Builder optGradientAccumulation(int k) {
            s.gradientAccumulation = k;
            return this;
        }

        /**
         * Computes the loss head ({@code lm_head}, softmax, cross-entropy) in chunks of about {@code tokens} tokens
         * ({@code rows x positions}, at least 8 positions per chunk), so that the {@code (B, T, vocab)} logits and
         * their gradients never exist at once; default: one chunk. Gradients are the same up to summation order.
         */
        public Builder optLossChunkTokens(int tokens) {
            s.lossChunkTokens = tokens;
            return this;
        }

        /** The FP16 loss scaler (default {@link DynamicLossScaler#create()}). */
        public Builder optLossScaler(DynamicLossScaler scaler) {
            s.lossScaler = scaler;
            return this;
        }

        /** The data-shuffling seed, recorded in checkpoints. */
        public Builder optSeed(long seed) {
            s.seed = seed;
            return this;
        }

        /**
         * Whether each step ends, on CPU, by giving the memory the C allocator kept from the step's freed tensors back
         * to the system ({@link NativeMemory#releaseFreed()}, glibc only; default true). Without it, tens of MB freed by
         * a step stay resident until the next step reuses them.
         */
        public Builder optReleaseFreedMemory(boolean release) {
            s.releaseFreedMemory = release;
            return this;
        }

        /**
         * What the caller knows that makes this run the run it is (the data's fingerprint, sequence length, batch,
         * the base model...), added to the {@linkplain FineTuner#runIdentity identity} its checkpoints record.
         */
        public Builder optRunIdentity(Map<String, String> fields) {
            s.runIdentity = Map.copyOf(fields);
            return this;
        }

        /**
         * Fuses the optimizer update into the backward: each checkpointed segment's parameters are updated, and their
         * gradients freed, as soon as its backward is done, so the full set of gradients never exists at once (see
         * {@link FusedUpdate}; in FP16 each layer's gradients are checked before its update and a layer that
         * overflows is back-propagated again at a lower scale, so an overflow never leaves a partial update; a model
         * with tied embeddings takes a check pass first). Needs one micro-batch per step.
         */
        public Builder optFusedUpdate(boolean fused) {
            s.fusedUpdate = fused;
            return this;
        }

        /**
         * Keeps the FP32 masters and the optimizer state on the host: the device keeps the (FP16) working weights and
         * the gradients; each parameter's gradient is copied to the host, updated there and the weight copied back.
         * On the CPU nothing moves, but the update takes the same path.
         */
        public Builder optOffloadOptimizer(boolean offload) {
            s.offloadOptimizer = offload;
            return this;
        }

        /** The optimizer's own settings (for tests: e.g. adamw8bit's block size). */
        StatefulOptimizer.Builder optimizerSettings() {
            return s.optimizerSettings;
        }

        public FineTuner build() {
            s.validate();
            return new FineTuner(s);
        }
    }
}
