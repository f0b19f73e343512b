package ai.djl.memopt.finetune;

import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingGradientCollector;
import ai.djl.memopt.memory.NativeMemory;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekMoE;
import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.nn.PhaseTimer;
import ai.djl.memopt.nn.Scalars;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import com.google.common.collect.ImmutableMap;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.Collections;
import java.util.IdentityHashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Set;
import java.util.stream.Stream;

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
 * <p>Training checkpoints ({@link #saveCheckpoint}) are directories written under a temporary name and renamed into
 * place: {@code config.json} and {@code model.safetensors} (FP32 weights - the masters in FP16 mode - under the Hugging
 * Face names, so the directory also loads as a model), {@code optimizer.safetensors} ({@code <name>.exp_avg},
 * {@code <name>.exp_avg_sq} or {@code <name>.momentum_buffer}) and {@code trainer_state.json} (step, data position,
 * seed, per-parameter optimizer steps, loss scaler, settings). {@link #restoreCheckpoint} puts all of it back, so
 * N steps, save, restore, M steps gives the weights of N + M uninterrupted steps.
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

    private static final int STATE_FORMAT = 1;

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
    private DynamicLossScaler scaler;
    private final StatefulOptimizer optimizer;
    private final NDManager stateManager;
    private final LearningRateSchedule schedule;
    private final int gradientAccumulation;
    private final int lossChunkTokens;
    private final String checkpointing;
    private final boolean releaseFreedMemory;
    private final List<String> checkpointedLayers;
    private final Precision precision;
    private final Map<String, Parameter> parameters;
    private final Map<String, NDArray> masters;
    private final long seed;
    private long step;
    private long dataPosition;
    private boolean closed;
    /** Row-wise embedding gradient and hand-differentiated head chunks (off only in tests, to compare with autograd). */
    boolean rowwiseGradients = true;
    /**
     * The GPU forms of the step's memory-saving loops (the head's weight gradient in one product instead of blocks of
     * vocabulary rows, the FP16 overflow check as one device reduction and one read instead of one read per
     * parameter): true on a GPU, settable by tests to compare both forms on the CPU.
     */
    boolean gpuPaths;
    /** Micro-batches whose embedding gradient went row by row, and head chunks differentiated by hand (for tests). */
    long rowwiseEmbeddings;
    long manualHeadChunks;

    private FineTuner(Builder b) {
        this.lm = b.model;
        this.precision = b.precision;
        this.gradientAccumulation = b.gradientAccumulation;
        this.lossChunkTokens = b.lossChunkTokens;
        this.seed = b.seed;
        this.releaseFreedMemory = b.releaseFreedMemory;
        this.gpuPaths = b.model.manager().getDevice().isGpu();
        this.schedule = b.schedule != null ? b.schedule : LearningRateSchedule.constant(b.learningRate);
        if (b.checkpointPolicy != null) {
            this.checkpointedLayers = Checkpointing.wrapChildren(Blocks.get(lm, "model.layers"), b.checkpointPolicy);
            for (String layer : checkpointedLayers) {
                String path = "model.layers." + layer;
                if (b.checkpointSublayers) {
                    Checkpointing.wrapChildren(Blocks.get(lm, path), SUBLAYERS);
                }
                if (b.checkpointExperts && BlockDecorator.unwrap(Blocks.get(lm, path + ".mlp")) instanceof DeepSeekMoE) {
                    Checkpointing.wrapChildren(Blocks.get(lm, path + ".mlp.experts"), CheckpointPolicy.all());
                }
            }
            this.checkpointing = b.checkpointName != null ? b.checkpointName : "custom";
        } else {
            this.checkpointedLayers = ImmutableList.of();
            this.checkpointing = "none";
        }
        Map<String, Parameter> params = new LinkedHashMap<>();
        Set<Parameter> seen = Collections.newSetFromMap(new IdentityHashMap<>());
        for (Map.Entry<String, Parameter> e : Blocks.parameters(lm).entrySet()) {
            if (seen.add(e.getValue())) {
                params.put(e.getKey(), e.getValue());
            }
        }
        this.parameters = ImmutableMap.copyOf(params);
        this.stateManager = lm.manager().newSubManager();
        this.optimizer = b.optimizerSettings.setManager(stateManager).optLearningRate(schedule.at(0)).build();
        if (precision == Precision.FP16) {
            this.masters = mixedPrecision(lm);
            this.scaler = b.lossScaler != null ? b.lossScaler : DynamicLossScaler.create();
        } else {
            this.masters = Map.of();
        }
    }

    /**
     * Wraps the whole model in a {@link MixedPrecisionBlock}: FP16 working copies of every weight except the FP32
     * islands of the default {@link ai.djl.memopt.precision.PrecisionPolicy} (RMS norms and the MoE router), so the
     * residual stream, projections and experts run and store their activations in FP16, while the model itself computes
     * softmax, rotary and the MoE combination in FP32 and returns FP32 logits. The wrapper only casts floating inputs
     * and outputs (token ids pass through), so the model is called directly afterwards.
     *
     * @return the FP32 masters by Hugging Face parameter name
     */
    private static Map<String, NDArray> mixedPrecision(DeepSeekForCausalLM lm) {
        MixedPrecisionBlock mixed = MixedPrecisionBlock.wrap(lm);
        Map<String, NDArray> masters = new LinkedHashMap<>();
        for (MixedPrecisionBlock.MasterWeight w : mixed.masterWeights()) {
            masters.put(w.path(), w.master());
        }
        return Collections.unmodifiableMap(masters);
    }

    public static Builder builder() {
        return new Builder();
    }

    /** The two halves of a decoder layer, which {@code nested} checkpointing recomputes one at a time. */
    private static final CheckpointPolicy SUBLAYERS =
            CheckpointPolicy.matching((name, block) -> name.equals("self_attn") || name.equals("mlp"));

    /**
     * A checkpoint policy for the decoder layers by name: {@code none} (null), {@code all}, {@code every:N} (layers 0,
     * N, 2N, ...) or {@code sqrt}. The decoder layers take rotary tables and the mask besides the hidden state, so they
     * are not a sequential chain and Chen et al.'s multi-layer segments cannot be formed; {@code sqrt} checkpoints
     * every {@code ceil(sqrt(L))}-th layer instead (about {@code sqrt(L)} checkpointed layers). {@code nested} and
     * {@code nested+experts} are {@code all} for the layers; {@link Builder#optCheckpointing(String)} then also
     * checkpoints each layer's {@code self_attn} and {@code mlp} inside it, and with {@code +experts} every routed
     * expert inside an MoE {@code mlp}, so that during a layer's backward these are recomputed and back-propagated one
     * at a time: only one half's (one expert's) saved activations exist at once, for one more forward of each. Each
     * expert's backward also passes through the MoE's token gather and the norm before it, which makes
     * {@code +experts} slower (bench-small in FP16: about 11 s a step against 9.5 s for {@code nested} and 8 s for
     * {@code all}).
     *
     * @throws IllegalArgumentException naming the bad value
     */
    public static CheckpointPolicy checkpointPolicy(String spec) {
        String s = spec.trim().toLowerCase(Locale.ROOT);
        if (s.equals("none")) {
            return null;
        }
        if (s.equals("all") || s.equals("nested") || s.equals("nested+experts")) {
            return CheckpointPolicy.all();
        }
        if (s.equals("sqrt")) {
            return (names, children) -> CheckpointPolicy.everyNth(
                    Math.max(1, (int) Math.ceil(Math.sqrt(children.size())))).plan(names, children);
        }
        if (s.startsWith("every:")) {
            int n;
            try {
                n = Integer.parseInt(s.substring("every:".length()));
            } catch (NumberFormatException e) {
                throw new IllegalArgumentException("bad checkpoint spec '" + spec + "': every:N needs an integer N");
            }
            Preconditions.checkArgument(n >= 1, "bad checkpoint spec '%s': N must be >= 1", spec);
            return CheckpointPolicy.everyNth(n);
        }
        throw new IllegalArgumentException(
                "unknown checkpoint spec '" + spec + "': expected none, all, nested, nested+experts, every:N or sqrt");
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
        return step;
    }

    /** Training rows consumed: the position of the next batch in {@link TokenDataset#trainBatch}. */
    public long dataPosition() {
        return dataPosition;
    }

    public long seed() {
        return seed;
    }

    /** The loss scale the next step will use (1 in FP32). */
    public float lossScale() {
        return scaler != null ? scaler.getScale() : 1f;
    }

    /** The loss scaler (FP16) or null. */
    public DynamicLossScaler lossScaler() {
        return scaler;
    }

    /**
     * One optimizer step on {@code batch} (see the class documentation).
     *
     * @throws IllegalArgumentException if the rows do not split into the accumulation steps or an id is outside the
     *     vocabulary
     */
    public StepResult step(TokenBatch batch) {
        Preconditions.checkState(!closed, "the FineTuner is closed");
        int k = gradientAccumulation;
        Preconditions.checkArgument(batch.rows() % k == 0,
                "a batch of %s rows does not split into %s gradient-accumulation micro-batches", batch.rows(), k);
        checkIds(batch);
        float lr = schedule.at(step);
        optimizer.setLearningRate(lr);
        float scale = lossScale();
        int micro = batch.rows() / k;
        double lossSum;
        try (NDManager losses = lm.manager().newSubManager()) {
            NDArray sum = null; // the micro-batches' mean losses, summed on the device and read once after the update
            for (int i = 0; i < k; i++) {
                NDArray loss = forwardBackward(batch.slice(i * micro, (i + 1) * micro), scale / k, losses);
                sum = sum == null ? loss : sum.add(loss);
                sum.attach(losses);
            }
            boolean skipped = update(scale);
            lossSum = sum.getFloat();
            if (releaseFreedMemory && !lm.manager().getDevice().isGpu()) {
                NativeMemory.releaseFreed();
            }
            step++;
            dataPosition += batch.rows();
            return new StepResult(step, lossSum / k, scale, skipped, batch.tokens(), lr);
        }
    }

    /** The optimizer update after the micro-batches' backward; false if an FP16 step was skipped. */
    private boolean update(float scale) {
        boolean skipped;
        if (scaler != null) {
            skipped = !updateFp16(scale);
        } else {
            try (PhaseTimer.Phase p = PhaseTimer.phase("optimizer")) {
                updateFp32();
            }
            skipped = false;
        }
        return skipped;
    }

    /** Forward and backward of a whole batch with the loss times {@code lossFactor}, no update (for tests). */
    double accumulateGradients(TokenBatch batch, float lossFactor) {
        checkIds(batch);
        try (NDManager losses = lm.manager().newSubManager()) {
            return forwardBackward(batch, lossFactor, losses).getFloat();
        }
    }

    private void checkIds(TokenBatch batch) {
        long max = batch.maxId();
        Preconditions.checkArgument(max < lm.config().vocabSize(),
                "token id %s is outside the model's vocabulary of %s (does the tokenizer belong to this model?)", max,
                lm.config().vocabSize());
    }

    /**
     * Forward and backward of one micro-batch; returns its mean loss, a detached FP32 scalar on the device attached to
     * {@code losses} (read by the caller once the step's work is queued). Gradients accumulate into the parameters.
     */
    private NDArray forwardBackward(TokenBatch micro, float lossFactor, NDManager losses) {
        try (NDManager m = lm.manager().newSubManager()) {
            NDArray ids = micro.toNDArray(m); // (b, T)
            ParameterStore ps = new ParameterStore(m, false);
            try (GradientCollector gc = checkpointedLayers.isEmpty()
                    ? m.getEngine().newGradientCollector()
                    : CheckpointingGradientCollector.open(m)) {
                EmbeddingRows embedding = rowwiseGradients
                        ? EmbeddingRows.gather(lm.model(), micro.ids(), micro.rows(), micro.seq(), m)
                        : null;
                rowwiseEmbeddings += embedding != null ? 1 : 0;
                if (embedding != null && gc instanceof CheckpointingGradientCollector) {
                    ((CheckpointingGradientCollector) gc).markComputed(embedding.embeddings());
                }
                int positions = Math.max(8, lossChunkTokens / micro.rows());
                NDArray loss = positions >= micro.seq() - 1
                        ? wholeLoss(gc, m, ps, ids, embedding, lossFactor)
                        : chunkedLoss(gc, m, ps, ids, embedding, lossFactor, positions);
                loss.attach(losses);
                if (embedding != null) {
                    try (PhaseTimer.Phase p = PhaseTimer.phase("embedding gradient")) {
                        embedding.accumulate();
                    }
                }
                return loss;
            }
        }
    }

    /** The final hidden states {@code (b, T, H)}, from the row-wise embedding when there is one. */
    private NDArray hidden(ParameterStore ps, NDArray ids, EmbeddingRows embedding) {
        try (PhaseTimer.Phase p = PhaseTimer.phase("forward")) {
            return hiddenStates(ps, ids, embedding);
        }
    }

    private NDArray hiddenStates(ParameterStore ps, NDArray ids, EmbeddingRows embedding) {
        return embedding != null
                ? lm.model().forwardEmbeddings(ps, embedding.embeddings(), null, true)
                : lm.model().forward(ps, new NDList(ids), true).head();
    }

    /** The loss head in one piece; returns the mean loss, detached, attached to {@code m}. */
    private NDArray wholeLoss(GradientCollector gc, NDManager m, ParameterStore ps, NDArray ids,
            EmbeddingRows embedding, float lossFactor) {
        NDArray hidden = hidden(ps, ids, embedding); // (b, T, H)
        hidden.attach(m);
        NDArray logits;
        NDArray loss;
        NDArray value;
        try (PhaseTimer.Phase p = PhaseTimer.phase("loss head")) {
            logits = lm.logits(ps, hidden, true); // (b, T, V) FP32
            loss = CausalLmLoss.mean(logits, ids);
            // the collector makes its seed gradient in the loss's manager: keep both in this step's manager
            logits.attach(m);
            loss.attach(m);
            value = loss.stopGradient();
            value.attach(m);
        }
        try (PhaseTimer.Phase p = PhaseTimer.phase("backward")) {
            if (lossFactor == 1f) {
                gc.backward(loss);
            } else {
                try (NDArray scaled = Scalars.mul(loss, lossFactor)) {
                    gc.backward(scaled);
                }
            }
        }
        loss.close();
        logits.close();
        return value;
    }

    /**
     * The loss head in chunks of positions: the final hidden state is cut from the graph as a leaf {@code h}; each chunk
     * computes its logits and loss and back-propagates at once (into {@code lm_head} and the gradient of {@code h}), so
     * only one chunk's {@code (b, c, V)} logits, log-probabilities and their gradients exist at a time instead of the
     * whole {@code (b, T, V)}; then the decoder stack is back-propagated from that gradient (as the scalar
     * {@code sum(hidden * grad)}, whose gradient is {@code grad}, so the checkpointing collector drives it). Chunk
     * {@code [s, e]} predicts tokens {@code s+1..e}; its mean is weighted by its share of the {@code T - 1} targets.
     *
     * <p>Once the head's weight has a gradient buffer, a chunk's projection is differentiated by hand
     * ({@link #headChunk}) so that its weight gradient is added into the buffer in blocks of vocabulary rows: autograd
     * would build the whole {@code (V, H)} weight gradient of every chunk as a temporary before adding it.
     */
    private NDArray chunkedLoss(GradientCollector gc, NDManager m, ParameterStore ps, NDArray ids,
            EmbeddingRows embedding, float lossFactor, int positions) {
        NDArray hidden = hidden(ps, ids, embedding); // (b, T, H)
        hidden.attach(m);
        NDArray h = hidden.stopGradient();
        h.attach(m);
        h.setRequiresGradient(true);
        NDArray headWeight = rowwiseGradients ? manualHeadWeight() : null;
        NDArray upstream = headWeight != null ? m.zeros(h.getShape(), h.getDataType(), h.getDevice()) : null;
        long t = ids.getShape().get(1);
        NDArray total = null; // sum of the chunks' weighted mean losses, on the device
        try (PhaseTimer.Phase head = PhaseTimer.phase("loss head")) {
            for (long s = 0; s < t - 1; s += positions) {
                long e = Math.min(t - 1, s + positions); // positions s..e, targets s+1..e
                double share = (double) (e - s) / (t - 1);
                NDArray part = lossChunk(m, ps, h, ids, s, e, share, lossFactor, headWeight, upstream); // detached
                NDArray weighted = Scalars.mul(part, share);
                weighted.attach(m);
                part.close();
                total = total == null ? weighted : total.addi(weighted);
                if (total != weighted) {
                    weighted.close();
                }
            }
            PtNDArray autogradPart = JniUtils.getGradient((PtNDArray) h); // chunks that went through autograd
            if (autogradPart != null) {
                autogradPart.attach(m);
                upstream = upstream == null ? autogradPart : upstream.addi(autogradPart);
            }
        }
        if (upstream == null) {
            return total; // nothing reached the hidden states
        }
        try (PhaseTimer.Phase p = PhaseTimer.phase("backward")) {
            NDArray target = hidden.mul(upstream).sum();
            target.attach(m);
            gc.backward(target);
        }
        return total;
    }

    /**
     * One chunk of the loss head, positions {@code s..e} predicting {@code s+1..e}, back-propagated at once into the
     * head's weight and {@code h}'s gradient (by hand into {@code upstream} when {@code headWeight} is given and has
     * its gradient buffer); returns the chunk's mean loss, detached, attached to {@code m}.
     */
    private NDArray lossChunk(NDManager m, ParameterStore ps, NDArray h, NDArray ids, long s, long e, double share,
            float lossFactor, NDArray headWeight, NDArray upstream) {
        try (NDManager c = m.newSubManager()) {
            NDArray hc = h.get(new NDIndex(":, {}:{}", s, e + 1)); // (b, c+1, H)
            hc.attach(c);
            NDArray idc = ids.get(new NDIndex(":, {}:{}", s, e + 1)); // (b, c+1)
            idc.attach(c);
            PtNDArray headGrad = headWeight != null ? JniUtils.getGradient((PtNDArray) headWeight) : null;
            if (headGrad != null) {
                headGrad.attach(c);
                NDArray slot = upstream.get(new NDIndex(":, {}:{}", s, e + 1)); // (b, c+1, H) view
                slot.attach(c);
                manualHeadChunks++;
                NDArray value = headChunk(c, hc, idc, headWeight, headGrad, lossFactor * share, slot);
                value.attach(m);
                return value;
            }
            NDArray logits = lm.logits(ps, hc, true); // (b, c+1, V) FP32
            logits.attach(c);
            NDArray loss = CausalLmLoss.mean(logits, idc);
            loss.attach(c);
            NDArray value = loss.stopGradient();
            value.attach(m);
            NDArray scaled = Scalars.mul(loss, lossFactor * share);
            scaled.attach(c);
            NDArray seed = scaled.onesLike();
            seed.attach(c);
            JniUtils.backward((PtNDArray) scaled, (PtNDArray) seed, false, false);
            return value;
        }
    }

    /**
     * The weight of the LM head when its chunks can be differentiated by hand: a plain bias-free {@code Linear}
     * {@code lm_head} (or the tied embedding table) that is trained; null otherwise (a decorated head, e.g. quantized
     * or with adapters, goes through autograd).
     */
    private NDArray manualHeadWeight() {
        Block head = lm.lmHead();
        Parameter p;
        if (head == null) {
            p = lm.model().tokenEmbedding().weight();
        } else if (head.getClass() == Linear.class && head.getParameters().size() == 1
                && head.getParameters().get(0).getKey().equals("weight")) {
            p = head.getParameters().get(0).getValue();
        } else {
            return null;
        }
        NDArray w = p.getArray();
        return p.requiresGradient() && w instanceof PtNDArray ? w : null;
    }

    /**
     * One loss-head chunk differentiated by hand, the ops autograd would run: {@code logits = hc W^T} (in W's type,
     * then FP32), the FP32 loss and its backward to the logits through autograd, then {@code dlogits} in W's type,
     * {@code dh = dlogits W} added into {@code slot}, and {@code dW = dlogits^T hc} added into the weight's gradient
     * buffer in blocks of vocabulary rows (temporaries of {@code rows x H} instead of the whole {@code (V, H)}).
     *
     * @param factor the factor of the chunk's mean loss in the differentiated objective
     * @return the chunk's mean loss, detached, in {@code c}
     */
    private NDArray headChunk(NDManager c, NDArray hc, NDArray idc, NDArray w, NDArray wGrad, double factor,
            NDArray slot) {
        boolean tied = lm.lmHead() == null;
        NDArray logits;
        JniUtils.setGradMode(false);
        try {
            NDArray raw;
            if (tied) {
                NDArray wt = w.transpose(); // (H, V) view
                wt.attach(c);
                raw = hc.matMul(wt); // (b, c+1, V) in W's type
            } else {
                raw = JniUtils.linear((PtNDArray) hc, (PtNDArray) w, null); // (b, c+1, V) in W's type
            }
            raw.attach(c);
            logits = raw.getDataType() == DataType.FLOAT32 ? raw : raw.toType(DataType.FLOAT32, false);
            logits.attach(c);
            if (logits != raw) {
                raw.close(); // the FP16 logits are not needed once the FP32 ones exist
            }
        } finally {
            JniUtils.setGradMode(true);
        }
        logits.setRequiresGradient(true);
        NDArray value;
        try (NDManager l = c.newSubManager()) {
            NDArray loss = CausalLmLoss.mean(logits, idc);
            loss.attach(l);
            value = loss.stopGradient();
            value.attach(c);
            NDArray scaled = Scalars.mul(loss, factor);
            scaled.attach(l);
            NDArray seed = scaled.onesLike();
            seed.attach(l);
            JniUtils.backward((PtNDArray) scaled, (PtNDArray) seed, false, false);
        }
        PtNDArray dLogits = JniUtils.getGradient((PtNDArray) logits); // (b, c+1, V) FP32
        dLogits.attach(c);
        JniUtils.setGradMode(false);
        try {
            NDArray dl = dLogits;
            if (w.getDataType() != DataType.FLOAT32) {
                dl = dLogits.toType(w.getDataType(), false); // the FP32 cast's backward
                dl.attach(c);
                dLogits.close();
                logits.close();
            }
            NDArray dh = dl.matMul(w); // (b, c+1, H)
            dh.attach(c);
            slot.addi(dh);
            long vocab = w.getShape().get(0);
            long width = w.getShape().get(1);
            NDArray dl2 = dl.reshape(-1, vocab); // (n, V)
            dl2.attach(c);
            NDArray x2 = hc.reshape(-1, width); // (n, H)
            x2.attach(c);
            long rows = gpuPaths ? vocab
                    : Math.max(1, RowBlocks.DEFAULT_BLOCK_ELEMENTS / Math.max(width, dl2.getShape().get(0)));
            for (long r0 = 0; r0 < vocab; r0 += rows) {
                long r1 = Math.min(vocab, r0 + rows);
                try (NDManager b = c.newSubManager()) {
                    NDArray cols = dl2.get(new NDIndex(":, {}:{}", r0, r1)); // (n, rows) view
                    cols.attach(b);
                    NDArray part = cols.transpose().matMul(x2); // (rows, H)
                    part.attach(b);
                    NDArray target = wGrad.get(new NDIndex("{}:{}", r0, r1)); // (rows, H) view
                    target.attach(b);
                    target.addi(part);
                }
            }
        } finally {
            JniUtils.setGradMode(true);
        }
        return value;
    }

    /**
     * The FP16 update, parameter by parameter: first one pass that only counts inf/NaN in the (scaled) gradients as
     * they are, then, if there are none, for each parameter its gradient is unscaled into FP32, applied to the FP32
     * master and the master copied into the FP16 working weight, block of rows by block of rows
     * ({@link StatefulOptimizer#update(String, NDArray, NDArray, float, NDArray)}): only one block's FP32 gradient and
     * FP16 copy exist at a time. {@code MixedPrecisionOptimizer} unscales every gradient to FP32 before the check, a
     * transient copy of 4 bytes per FP16 parameter (about 1.1 GB for bench-small) that would dominate a step's memory.
     *
     * @return false if the step was skipped (overflow; the scale is lowered)
     */
    private boolean updateFp16(float scale) {
        boolean overflow = false;
        PhaseTimer.Phase check = PhaseTimer.phase("overflow check");
        if (gpuPaths) {
            overflow = !allGradientsFinite();
        } else {
            for (Parameter p : parameters.values()) {
                if (!p.requiresGradient()) {
                    continue;
                }
                try (NDArray g = p.getArray().getGradient()) {
                    if (!allFinite(g)) {
                        overflow = true;
                        break;
                    }
                }
            }
        }
        check.close();
        PhaseTimer.Phase update = PhaseTimer.phase("optimizer");
        try {
            return applyFp16(scale, overflow);
        } finally {
            update.close();
        }
    }

    private boolean applyFp16(float scale, boolean overflow) {
        if (!scaler.update(overflow)) {
            for (Parameter p : parameters.values()) {
                if (p.requiresGradient()) {
                    JniUtils.zeroGrad((PtNDArray) p.getArray());
                }
            }
            return false;
        }
        updateAll(scale);
        return true;
    }

    /**
     * Whether every trainable gradient is finite, with one host read: the maximum and minimum of each gradient are finite
     * exactly when all its elements are (an infinity is the maximum or the minimum, and a NaN propagates through both),
     * so the check reduces each gradient to two numbers on the device and tests all of them at once.
     */
    boolean allGradientsFinite() {
        try (NDManager t = lm.manager().newSubManager()) {
            NDList extremes = new NDList();
            // gradients of one type concatenated in groups of about 2^24 elements: a few reductions, not two per tensor
            Map<DataType, NDList> pending = new LinkedHashMap<>();
            Map<DataType, long[]> sizes = new LinkedHashMap<>();
            for (Parameter p : parameters.values()) {
                if (!p.requiresGradient()) {
                    continue;
                }
                NDArray g = p.getArray().getGradient();
                g.attach(t);
                NDArray flat = g.reshape(-1);
                flat.attach(t);
                NDList group = pending.computeIfAbsent(g.getDataType(), k -> new NDList());
                group.add(flat);
                long[] size = sizes.computeIfAbsent(g.getDataType(), k -> new long[1]);
                size[0] += flat.size();
                if (size[0] >= 1L << 24) {
                    extremes.addAll(extremes(group, t));
                    group.clear();
                    size[0] = 0;
                }
            }
            for (NDList group : pending.values()) {
                if (!group.isEmpty()) {
                    extremes.addAll(extremes(group, t));
                }
            }
            if (extremes.isEmpty()) {
                return true;
            }
            NDArray all = ai.djl.ndarray.NDArrays.stack(extremes); // (2P)
            all.attach(t);
            NDArray bad = all.isInfinite().logicalOr(all.isNaN()).any();
            bad.attach(t);
            return !bad.getBoolean();
        }
    }

    /** The maximum and minimum of the concatenated {@code arrays}, as FP32 0-dimensional arrays in {@code t}. */
    private static NDList extremes(NDList arrays, NDManager t) {
        NDArray all = arrays.size() == 1 ? arrays.get(0) : ai.djl.ndarray.NDArrays.concat(arrays);
        all.attach(t);
        NDList out = new NDList(2);
        for (NDArray x : new NDArray[] {all.max(), all.min()}) { // 0-dimensional
            x.attach(t);
            NDArray x32 = x.getDataType() == DataType.FLOAT32 ? x : x.toType(DataType.FLOAT32, false);
            x32.attach(t);
            out.add(x32);
        }
        if (all != arrays.get(0)) {
            all.close(); // the concatenated copy of this group's gradients
        }
        return out;
    }

    /** Whether every element of {@code a} is finite, checked in blocks of rows (block-sized boolean temporaries). */
    static boolean allFinite(NDArray a) {
        long rows = RowBlocks.rowsPerBlock(a.getShape(), RowBlocks.DEFAULT_BLOCK_ELEMENTS);
        long total = a.getShape().dimension() == 0 ? 1 : a.getShape().get(0);
        for (long r0 = 0; r0 < total; r0 += rows) {
            try (NDManager t = a.getManager().newSubManager()) {
                NDArray block = RowBlocks.rows(a, r0, Math.min(total, r0 + rows), rows, total, t);
                // results land in the block's manager, which is the caller's when the block is the whole array
                try (NDArray inf = block.isInfinite();
                        NDArray nan = block.isNaN();
                        NDArray either = inf.logicalOr(nan);
                        NDArray any = either.any()) {
                    if (any.getBoolean()) {
                        return false;
                    }
                }
            }
        }
        return true;
    }

    /**
     * Every trainable parameter through {@link StatefulOptimizer#updateAll}, FP16 working weights receiving their
     * updated masters, gradients divided by {@code gradDivisor} (the loss scale): on flat buckets in the GPU form,
     * else parameter by parameter in blocks of rows (unscaled in FP32 block by block); then the gradients are zeroed.
     */
    private void updateAll(float gradDivisor) {
        try (NDManager t = lm.manager().newSubManager()) {
            List<String> ids = new ArrayList<>();
            List<NDArray> weights = new ArrayList<>();
            List<NDArray> grads = new ArrayList<>();
            List<NDArray> copies = new ArrayList<>();
            for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
                Parameter p = e.getValue();
                if (!p.requiresGradient()) {
                    continue;
                }
                NDArray w = p.getArray();
                NDArray master = masters.get(e.getKey());
                NDArray g = w.getGradient();
                g.attach(t);
                ids.add(p.getId());
                weights.add(master != null ? master : w);
                grads.add(g);
                copies.add(master != null ? w : null);
            }
            optimizer.updateAll(ids, weights, grads, gradDivisor, copies, gpuPaths);
        }
        for (Parameter p : parameters.values()) {
            if (p.requiresGradient()) {
                JniUtils.zeroGrad((PtNDArray) p.getArray());
            }
        }
    }

    private void updateFp32() {
        updateAll(1f);
    }

    /** Mean next-token loss of a batch without gradients (held-out evaluation); closes what it creates. */
    public double evaluate(TokenBatch batch) {
        checkIds(batch);
        try (NDManager m = lm.manager().newSubManager()) {
            NDArray ids = batch.toNDArray(m);
            NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(ids), false).head();
            try (NDArray loss = CausalLmLoss.mean(logits, ids)) {
                return loss.getFloat();
            } finally {
                logits.close();
            }
        }
    }

    /** Bytes of weights, FP32 masters, existing gradients and optimizer state, from the arrays. */
    public StateBytes stateBytes() {
        long weights = 0;
        long grads = 0;
        for (Parameter p : parameters.values()) {
            NDArray w = p.getArray();
            long bytes = w.size() * w.getDataType().getNumOfBytes();
            weights += bytes;
            if (w instanceof PtNDArray && w.hasGradient()) {
                NDArray g = JniUtils.getGradient((PtNDArray) w);
                if (g != null) {
                    grads += g.size() * g.getDataType().getNumOfBytes();
                    g.close();
                }
            }
        }
        long masterBytes = 0;
        for (NDArray a : masters.values()) {
            masterBytes += a.size() * a.getDataType().getNumOfBytes();
        }
        return new StateBytes(weights, masterBytes, grads, optimizer.stateBytes());
    }

    // ------------------------------------------------------------------ checkpoints

    /**
     * The FP32 masters of the trainable weights in FP16 mode, by Hugging Face name (empty in FP32 mode). Frozen weights
     * have none: they never change, so their FP16 working copy is all that is kept.
     */
    public Map<String, NDArray> masterWeights() {
        return masters;
    }

    /** The FP32 value of each weight (the master in FP16 mode), by Hugging Face name. */
    private Map<String, NDArray> fp32Weights() {
        Map<String, NDArray> out = new LinkedHashMap<>();
        for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
            NDArray master = masters.get(e.getKey());
            out.put(e.getKey(), master != null ? master : e.getValue().getArray());
        }
        return out;
    }

    /**
     * Writes {@code config.json} and {@code model.safetensors} (FP32 weights, Hugging Face names) into {@code dir},
     * each file atomically; with a tokenizer copied next to them it is a model directory {@code DeepSeekLoader} and
     * transformers load.
     */
    public void saveModel(Path dir) throws IOException {
        Files.createDirectories(dir);
        writeWeights(dir.resolve("model.safetensors"));
        AtomicFiles.writeString(dir.resolve("config.json"), lm.config().toJson() + "\n");
    }

    private void writeWeights(Path file) throws IOException {
        SafetensorsWriter writer = new SafetensorsWriter().putMetadata("format", "pt");
        for (Map.Entry<String, NDArray> e : fp32Weights().entrySet()) {
            NDArray a = e.getValue();
            if (a.getDataType() == DataType.FLOAT32) {
                writer.add(e.getKey(), a);
            } else {
                // a frozen weight held only as its FP16 working copy: widened one tensor at a time while writing
                writer.add(e.getKey(), SafetensorsDType.F32, a.getShape().getShape(), () -> {
                    try (NDArray wide = a.toType(DataType.FLOAT32, true)) {
                        return wide.toByteBuffer();
                    }
                });
            }
        }
        writer.write(file);
    }

    /**
     * Saves a training checkpoint as the directory {@code dir} (see the class documentation): everything is written into
     * a temporary sibling directory first, which is then renamed to {@code dir} (replacing an older one of that name).
     */
    public void saveCheckpoint(Path dir) throws IOException {
        Path target = dir.toAbsolutePath();
        Path parent = target.getParent();
        Files.createDirectories(parent);
        Path tmp = Files.createTempDirectory(parent, "." + target.getFileName() + ".tmp-");
        try {
            writeWeights(tmp.resolve("model.safetensors"));
            AtomicFiles.writeString(tmp.resolve("config.json"), lm.config().toJson() + "\n");
            SafetensorsWriter opt = new SafetensorsWriter().putMetadata("format", "pt");
            JsonObject steps = new JsonObject();
            for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
                String id = e.getValue().getId();
                steps.addProperty(e.getKey(), optimizer.stepCount(id));
                for (Map.Entry<String, NDArray> s : optimizer.stateArrays(id).entrySet()) {
                    opt.add(e.getKey() + "." + s.getKey(), s.getValue());
                }
            }
            opt.write(tmp.resolve("optimizer.safetensors"));
            JsonObject state = new JsonObject();
            state.addProperty("format", STATE_FORMAT);
            state.addProperty("step", step);
            state.addProperty("data_position", dataPosition);
            state.addProperty("seed", seed);
            state.addProperty("precision", precision.name().toLowerCase(Locale.ROOT));
            state.addProperty("checkpointing", checkpointing);
            state.addProperty("gradient_accumulation", gradientAccumulation);
            JsonObject o = new JsonObject();
            o.addProperty("kind", optimizer.kind().name().toLowerCase(Locale.ROOT));
            o.addProperty("beta1", optimizer.beta1());
            o.addProperty("beta2", optimizer.beta2());
            o.addProperty("epsilon", optimizer.epsilon());
            o.addProperty("weight_decay", optimizer.weightDecay());
            o.addProperty("momentum", optimizer.momentum());
            o.add("parameter_steps", steps);
            state.add("optimizer", o);
            JsonObject lr = new JsonObject();
            lr.addProperty("peak", schedule.peak());
            lr.addProperty("warmup", schedule.warmup());
            lr.addProperty("total", schedule.total());
            lr.addProperty("min_ratio", schedule.minRatio());
            state.add("schedule", lr);
            if (scaler != null) {
                state.add("loss_scaler", JsonParser.parseString(scaler.toJson()));
            }
            AtomicFiles.writeString(tmp.resolve("trainer_state.json"),
                    new GsonBuilder().setPrettyPrinting().create().toJson(state) + "\n");
            Path old = null;
            if (Files.exists(target)) {
                old = Files.createTempDirectory(parent, "." + target.getFileName() + ".old-");
                Files.delete(old);
                Files.move(target, old, StandardCopyOption.ATOMIC_MOVE);
            }
            Files.move(tmp, target, StandardCopyOption.ATOMIC_MOVE);
            if (old != null) {
                AtomicFiles.deleteTree(old);
            }
        } finally {
            if (Files.exists(tmp)) {
                AtomicFiles.deleteTree(tmp);
            }
        }
    }

    /** Whether {@code dir} looks like a training checkpoint written by {@link #saveCheckpoint}. */
    public static boolean isCheckpoint(Path dir) {
        return Files.isRegularFile(dir.resolve("trainer_state.json"))
                && Files.isRegularFile(dir.resolve("model.safetensors"));
    }

    /**
     * Restores weights, FP32 masters, optimizer state, loss scaler, step counter and data position from a checkpoint
     * written by {@link #saveCheckpoint} for the same architecture, precision and optimizer.
     *
     * @throws IllegalArgumentException naming the file and field that does not match
     * @throws IOException if a file is missing or corrupt
     */
    public void restoreCheckpoint(Path dir) throws IOException {
        Preconditions.checkState(!closed, "the FineTuner is closed");
        Path stateFile = dir.resolve("trainer_state.json");
        if (!isCheckpoint(dir)) {
            throw new IOException(dir + " is not a training checkpoint (no trainer_state.json / model.safetensors)");
        }
        JsonObject state;
        try {
            state = JsonParser.parseString(Files.readString(stateFile, StandardCharsets.UTF_8)).getAsJsonObject();
        } catch (RuntimeException e) {
            throw new IOException(stateFile + " is not a JSON object: " + e.getMessage(), e);
        }
        int format = intField(state, "format", stateFile);
        Preconditions.checkArgument(format == STATE_FORMAT, "%s: format %s, this version reads %s", stateFile,
                format, STATE_FORMAT);
        DeepSeekConfig config = DeepSeekConfig.fromJson(dir.resolve("config.json"));
        Preconditions.checkArgument(config.equals(lm.config()),
                "%s: the checkpoint's model config differs from the model being trained", dir.resolve("config.json"));
        String p = stringField(state, "precision", stateFile);
        Preconditions.checkArgument(Precision.parse(p) == precision,
                "%s: the checkpoint was trained in %s, this run uses %s", stateFile, p,
                precision.name().toLowerCase(Locale.ROOT));
        JsonObject o = state.getAsJsonObject("optimizer");
        Preconditions.checkArgument(o != null, "%s has no optimizer object", stateFile);
        String kind = stringField(o, "kind", stateFile);
        Preconditions.checkArgument(StatefulOptimizer.Kind.parse(kind) == optimizer.kind(),
                "%s: the checkpoint's optimizer is %s, this run uses %s", stateFile, kind,
                optimizer.kind().name().toLowerCase(Locale.ROOT));
        JsonObject steps = o.getAsJsonObject("parameter_steps");
        Preconditions.checkArgument(steps != null, "%s has no optimizer.parameter_steps", stateFile);
        long newStep = longField(state, "step", stateFile);
        long newPosition = longField(state, "data_position", stateFile);
        Preconditions.checkArgument(newStep >= 0 && newPosition >= 0, "%s: negative step or data position",
                stateFile);
        DynamicLossScaler scaler = null;
        if (precision == Precision.FP16) {
            Preconditions.checkArgument(state.has("loss_scaler"), "%s has no loss_scaler (FP16 run)", stateFile);
            scaler = DynamicLossScaler.fromJson(state.get("loss_scaler").toString());
        }
        try (NDManager tmp = lm.manager().newSubManager();
                SafetensorsFile weights = SafetensorsFile.open(dir.resolve("model.safetensors"));
                SafetensorsFile opt = SafetensorsFile.open(dir.resolve("optimizer.safetensors"))) {
            for (String name : parameters.keySet()) {
                Preconditions.checkArgument(weights.contains(name), "%s has no tensor %s",
                        dir.resolve("model.safetensors"), name);
                Preconditions.checkArgument(steps.has(name), "%s: optimizer.parameter_steps has no %s", stateFile,
                        name);
            }
            boolean gradMode = JniUtils.isGradMode();
            JniUtils.setGradMode(false); // in-place writes into leaves that require grad
            try {
                for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
                    String name = e.getKey();
                    NDArray w = e.getValue().getArray();
                    NDArray loaded = weights.load(tmp, name, DataType.FLOAT32).toDevice(w.getDevice(), false);
                    Preconditions.checkArgument(loaded.getShape().equals(w.getShape()),
                            "%s: tensor %s has shape %s, the model's is %s", dir.resolve("model.safetensors"), name,
                            loaded.getShape(), w.getShape());
                    NDArray master = masters.get(name);
                    if (master != null) {
                        master.set(new NDIndex("..."), loaded);
                        w.set(new NDIndex("..."), loaded.toType(w.getDataType(), false));
                    } else {
                        w.set(new NDIndex("..."), loaded.toType(w.getDataType(), false));
                    }
                    Map<String, NDArray> arrays = new LinkedHashMap<>();
                    for (String key : new String[] {"exp_avg", "exp_avg_sq", "momentum_buffer"}) {
                        if (opt.contains(name + "." + key)) {
                            arrays.put(key, opt.load(tmp, name + "." + key, DataType.FLOAT32));
                        }
                    }
                    optimizer.restore(e.getValue().getId(), name, steps.get(name).getAsLong(), arrays, w);
                }
            } finally {
                JniUtils.setGradMode(gradMode);
            }
        }
        if (scaler != null) {
            this.scaler = scaler;
        }
        for (Parameter param : parameters.values()) {
            if (param.requiresGradient() && param.getArray() instanceof PtNDArray) {
                JniUtils.zeroGrad((PtNDArray) param.getArray());
            }
        }
        step = newStep;
        dataPosition = newPosition;
    }

    /** The newest checkpoint directory (highest step) among {@code dir}'s children written by {@link #saveCheckpoint}. */
    public static Path latestCheckpoint(Path dir) throws IOException {
        if (isCheckpoint(dir)) {
            return dir;
        }
        if (!Files.isDirectory(dir)) {
            throw new IOException(dir + " does not exist");
        }
        Path best = null;
        long bestStep = -1;
        try (Stream<Path> s = Files.list(dir)) {
            for (Path c : (Iterable<Path>) s::iterator) {
                if (c.getFileName().toString().startsWith(".") || !isCheckpoint(c)) {
                    continue;
                }
                long st = readStep(c);
                if (st > bestStep) {
                    bestStep = st;
                    best = c;
                }
            }
        }
        if (best == null) {
            throw new IOException(dir + " holds no training checkpoint (a directory with trainer_state.json)");
        }
        return best;
    }

    /** The step recorded in a checkpoint's {@code trainer_state.json}. */
    public static long readStep(Path checkpoint) throws IOException {
        Path f = checkpoint.resolve("trainer_state.json");
        try {
            return longField(JsonParser.parseString(Files.readString(f, StandardCharsets.UTF_8)).getAsJsonObject(),
                    "step", f);
        } catch (IllegalStateException | com.google.gson.JsonParseException e) {
            throw new IOException(f + " is not a JSON object: " + e.getMessage(), e);
        }
    }

    private static String stringField(JsonObject o, String key, Path file) {
        Preconditions.checkArgument(o.has(key) && o.get(key).isJsonPrimitive(), "%s has no field '%s'", file, key);
        return o.get(key).getAsString();
    }

    private static long longField(JsonObject o, String key, Path file) {
        try {
            return Long.parseLong(stringField(o, key, file));
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException(file + ": field '" + key + "' is not an integer", e);
        }
    }

    private static int intField(JsonObject o, String key, Path file) {
        return Math.toIntExact(longField(o, key, file));
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
        private DeepSeekForCausalLM model;
        private CheckpointPolicy checkpointPolicy;
        private String checkpointName;
        private boolean checkpointSublayers;
        private boolean checkpointExperts;
        private Precision precision = Precision.FP32;
        // kind, betas, epsilon, weight decay and momentum, with the optimizer's own defaults and validation
        private final StatefulOptimizer.Builder optimizerSettings = StatefulOptimizer.builder();
        private float learningRate = 1e-4f;
        private LearningRateSchedule schedule;
        private int gradientAccumulation = 1;
        private int lossChunkTokens = Integer.MAX_VALUE;
        private DynamicLossScaler lossScaler;
        private long seed;
        private boolean releaseFreedMemory = true;

        private Builder() {}

        /** The model, with FP32 weights (in FP16 mode they become the masters of FP16 working copies). */
        public Builder setModel(DeepSeekForCausalLM model) {
            this.model = model;
            return this;
        }

        /** Checkpoints {@code model.layers} with {@code policy} (null: no checkpointing). */
        public Builder optCheckpointing(CheckpointPolicy policy) {
            return optCheckpointing(policy, policy == null ? "none" : "custom");
        }

        /** As {@link #optCheckpointing(CheckpointPolicy)} with a name recorded in checkpoints. */
        public Builder optCheckpointing(CheckpointPolicy policy, String name) {
            this.checkpointPolicy = policy;
            this.checkpointName = name;
            this.checkpointSublayers = false;
            this.checkpointExperts = false;
            return this;
        }

        /**
         * {@code none}, {@code all}, {@code nested}, {@code nested+experts}, {@code every:N} or {@code sqrt}; see
         * {@link FineTuner#checkpointPolicy}.
         */
        public Builder optCheckpointing(String spec) {
            String s = spec.trim().toLowerCase(Locale.ROOT);
            optCheckpointing(checkpointPolicy(s), s);
            this.checkpointSublayers = s.startsWith("nested");
            this.checkpointExperts = s.equals("nested+experts");
            return this;
        }

        public Builder optPrecision(Precision precision) {
            this.precision = Preconditions.checkNotNull(precision, "precision");
            return this;
        }

        public Builder optOptimizer(StatefulOptimizer.Kind kind) {
            optimizerSettings.optKind(kind);
            return this;
        }

        /** A constant learning rate (ignored when {@link #optSchedule} is given). */
        public Builder optLearningRate(float lr) {
            this.learningRate = lr;
            return this;
        }

        public Builder optSchedule(LearningRateSchedule schedule) {
            this.schedule = schedule;
            return this;
        }

        public Builder optBetas(float beta1, float beta2) {
            optimizerSettings.optBetas(beta1, beta2);
            return this;
        }

        public Builder optEpsilon(float epsilon) {
            optimizerSettings.optEpsilon(epsilon);
            return this;
        }

        /** See {@link StatefulOptimizer.Builder#optWeightDecay}. */
        public Builder optWeightDecay(float weightDecay) {
            optimizerSettings.optWeightDecay(weightDecay);
            return this;
        }

        /** SGD momentum. */
        public Builder optMomentum(float momentum) {
            optimizerSettings.optMomentum(momentum);
            return this;
        }

        /** Micro-batches per optimizer step (each batch's rows are split into this many). */
        public Builder optGradientAccumulation(int k) {
            this.gradientAccumulation = k;
            return this;
        }

        /**
         * Computes the loss head ({@code lm_head}, softmax, cross-entropy) in chunks of about {@code tokens} tokens
         * ({@code rows x positions}, at least 8 positions per chunk), so that the {@code (B, T, vocab)} logits and
         * their gradients never exist at once; default: one chunk. Gradients are the same up to summation order.
         */
        public Builder optLossChunkTokens(int tokens) {
            this.lossChunkTokens = tokens;
            return this;
        }

        /** The FP16 loss scaler (default {@link DynamicLossScaler#create()}). */
        public Builder optLossScaler(DynamicLossScaler scaler) {
            this.lossScaler = scaler;
            return this;
        }

        /** The data-shuffling seed, recorded in checkpoints. */
        public Builder optSeed(long seed) {
            this.seed = seed;
            return this;
        }

        /**
         * Whether each step ends, on CPU, by giving the memory the C allocator kept from the step's freed tensors back
         * to the system ({@link NativeMemory#releaseFreed()}, glibc only; default true). Without it, tens of MB freed by
         * a step stay resident until the next step reuses them.
         */
        public Builder optReleaseFreedMemory(boolean release) {
            this.releaseFreedMemory = release;
            return this;
        }

        public FineTuner build() {
            Preconditions.checkArgument(model != null, "FineTuner needs a model: call setModel");
            Preconditions.checkArgument(model.manager() != null, "the model has no weights: load or initialise it");
            Preconditions.checkArgument(model.dataType() == DataType.FLOAT32,
                    "the model's weights are %s: load it in FLOAT32 (FP16 training keeps FP32 masters and makes its"
                            + " own FP16 copies)", model.dataType());
            Preconditions.checkArgument(gradientAccumulation >= 1, "gradient accumulation must be >= 1, got %s",
                    gradientAccumulation);
            Preconditions.checkArgument(learningRate >= 0 && Float.isFinite(learningRate),
                    "learning rate must be finite and >= 0, got %s", learningRate);
            Preconditions.checkArgument(lossChunkTokens >= 1, "loss chunk must be >= 1 token, got %s",
                    lossChunkTokens);
            Preconditions.checkArgument(lossScaler == null || precision == Precision.FP16,
                    "a loss scaler is only used in FP16 training");
            return new FineTuner(this);
        }
    }
}
