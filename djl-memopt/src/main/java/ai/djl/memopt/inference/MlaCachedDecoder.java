package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekMoE;
import ai.djl.memopt.model.deepseek.DeepSeekModel;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import com.google.common.base.Preconditions;
import java.util.ArrayList;
import java.util.List;

/**
 * DeepSeek decoding with the compressed MLA cache: per token and layer only the normalised latent ({@code kv_lora_rank}
 * values, after {@code kv_a_layernorm}) and the shared rotated key ({@code qk_rope_head_dim}) are kept, instead of
 * per-head keys and values. For DeepSeek-V3 that is 576 values per token and layer against 128 x (192 + 128) = 40,960
 * in Hugging Face's cache.
 *
 * <p>{@code kv_b_proj} is absorbed: its weight {@code (H (nope + v), r)} (read with {@link LinearWeightSource#weightOf},
 * so quantized or LoRA projections work) splits into {@code W_UK (H, nope, r)} and {@code W_UV (H, v, r)}. Per layer
 * and step:
 *
 * <pre>
 *   q_latent = q_nope (B, H, T, nope) x W_UK (1, H, nope, r)                  -> (B, H, T, r)
 *   scores   = (q_latent x c_kv^T (B, 1, r, S) + q_pe x k_pe^T (B, 1, rope, S)) * scale, + mask, softmax in FP32
 *   out      = (probs x c_kv (B, 1, S, r)) x W_UV^T (1, H, r, v) -> (B, T, H v) -> o_proj
 * </pre>
 *
 * The rest of the layer (norms, MLP/MoE) and the final norm and {@code lm_head} are the model's own blocks, called
 * through their fields, so decorators apply. Cache buffers {@code (B, maxLength, r)} and {@code (B, maxLength, rope)}
 * per layer are allocated once per session and written in place; prefill runs the same absorbed path over the prompt.
 * Only the last position's logits are computed.
 *
 * <p><b>Host synchronisation.</b> With {@link ExpertDispatch#GATHERED} (the default on a GPU) creating the decoder
 * calls {@link DeepSeekMoE#enableGatheredDispatch()} on every MoE layer: their experts' weights are stacked once (the
 * per-expert arrays become views of the stacks, so memory does not grow; the stacks follow in-place weight updates and
 * are rebuilt if a projection is replaced). A decode step of {@code B} tokens with
 * {@code B x num_experts_per_tok <= n_routed_experts} then gathers the chosen experts on the device and reads nothing
 * back: the step's only device-to-host copy is the sampled ids ({@link LogitsSampler}). A prefill call (or a bigger
 * batch) takes the sorted dispatch, which reads the chosen expert ids once per MoE layer per call (amortised over the
 * prompt). Experts that cannot be stacked (decorated, mixed kinds) keep the sorted dispatch at every step, with a
 * warning at creation. On the CPU the default is {@link ExpertDispatch#SORTED}: there is no device queue for a read to
 * wait on, and gathering copies weights the sorted path reads in place.
 *
 * <p><b>Several devices.</b> With a {@link StagePlan} of several stages (a model loaded with the plan's
 * {@link StagePlan#newPlacement() placement}), each stage's layers run on its device with that device's part of the
 * cache, and only the hidden state {@code (B, T, hidden)} moves from one stage to the next (plus, per step, the new
 * tokens' position ids and mask columns, 16 bytes per token); the final norm and {@code lm_head} run where their
 * weights are (the last stage, or the first with tied embeddings), and the logits stay on that device. A one-stage
 * plan is the single-device decoder; the same code runs both, so a split over stages on one device gives the
 * single-device logits bit for bit. {@link Session#hops()} counts what crossed between stages.
 *
 * <pre>{@code
 * LanguageModel lm = new MlaCachedDecoder(deepSeekForCausalLM, device);
 * GenerationResult r = new Generator(lm, tokenizer).generate(promptIds, SamplingParams.greedy(64));
 * // split over two GPUs: lm loaded with plan.newPlacement()
 * LanguageModel split = new MlaCachedDecoder(lm, StagePlan.parse(List.of(Device.gpu(0), Device.gpu(1)), "0-13,14-26",
 *         27), ExpertDispatch.AUTO);
 * }</pre>
 */
public final class MlaCachedDecoder implements LanguageModel {

    private final DeepSeekForCausalLM model;
    private final DeepSeekConfig config;
    private final DeepSeekModel decoder;
    private final StagePlan plan;
    private final DecoderStage[] stages;
    private final Device headDevice;
    private final DataType dtype;
    private final DecodePath decodePath;
    private final String javaPathReason;
    private final int scriptMaxBatch;

    /** A decoder with {@link ExpertDispatch#AUTO}: gathered experts on a GPU, sorted on the CPU. */
    public MlaCachedDecoder(DeepSeekForCausalLM model, Device device) {
        this(model, device, ExpertDispatch.AUTO);
    }

    /**
     * A decoder running the routed experts as {@code experts} says. The choice is applied to the model's MoE layers
     * ({@link DeepSeekMoE#enableGatheredDispatch()} / {@link DeepSeekMoE#disableGatheredDispatch()}), so it holds for
     * every decoder over the same model until another is created.
     */
    public MlaCachedDecoder(DeepSeekForCausalLM model, Device device, ExpertDispatch experts) {
        this(model, StagePlan.single(Preconditions.checkNotNull(device, "device"), model.config().numHiddenLayers()),
                experts);
    }

    /**
     * A decoder over the stages of {@code plan} ({@link ExpertDispatch#AUTO} resolved per stage device).
     *
     * @throws IllegalArgumentException if the plan does not cover the model's layers, or a weight is not on the device
     *     the plan gives it (naming the weight, its device and the plan's)
     */
    public MlaCachedDecoder(DeepSeekForCausalLM model, StagePlan plan, ExpertDispatch experts) {
        this(model, plan, experts, DecodePath.AUTO);
    }

    /**
     * A decoder over the stages of {@code plan} whose layers run as {@code path} says ({@link DecodePath#AUTO}: the
     * TorchScript step where every layer of every stage qualifies, unless the system property
     * {@value DecodePath#PROPERTY} forces a path; on a GPU, per session, only for batches up to
     * {@value DecodePath#SCRIPT_MAX_BATCH_PROPERTY}).
     *
     * @throws IllegalArgumentException as the other constructors, or if {@link DecodePath#TORCHSCRIPT} is asked for a
     *     model with a layer that does not qualify (naming it)
     */
    public MlaCachedDecoder(DeepSeekForCausalLM model, StagePlan plan, ExpertDispatch experts, DecodePath path) {
        Preconditions.checkNotNull(path, "path");
        this.model = Preconditions.checkNotNull(model, "model");
        this.plan = Preconditions.checkNotNull(plan, "plan");
        Preconditions.checkNotNull(experts, "experts");
        this.config = model.config();
        this.decoder = model.model();
        int n = decoder.layers().size();
        Preconditions.checkArgument(plan.numLayers() == n, "the stage plan covers %s layers, the model has %s",
                plan.numLayers(), n);
        this.dtype = model.dataType();
        this.stages = DecoderWiring.stages(model, plan, dtype, experts);
        DecoderWiring.checkDevice(decoder.embedTokens(), "model.embed_tokens.", plan.stages().get(0).device(), "the first stage");
        this.headDevice = DecoderWiring.deviceOf(decoder.norm(), plan.stages().get(stages.length - 1).device());
        if (model.lmHead() != null) {
            DecoderWiring.checkDevice(model.lmHead(), "lm_head.", headDevice, "the final norm's device");
        }
        DecodePath wanted = path.withProperty();
        String why = null;
        if (wanted == DecodePath.JAVA) {
            why = "the Java path was asked for (" + (path == DecodePath.JAVA ? "DecodePath.JAVA" : "-D"
                    + DecodePath.PROPERTY + ")");
        }
        for (int s = 0; why == null && s < stages.length; s++) {
            why = stages[s].scriptUnsupportedReason();
        }
        if (wanted == DecodePath.TORCHSCRIPT && why != null) {
            throw new IllegalArgumentException("the TorchScript decode step cannot run this model: " + why);
        }
        if (why == null) {
            ScriptBatchPolicy policy = ScriptBatchPolicy.of(wanted);
            for (int s = 0; s < stages.length; s++) {
                stages[s].useScript(model, s == 0,
                        s == stages.length - 1 && stages[s].device().equals(headDevice), policy);
            }
            this.scriptMaxBatch = policy.maxBatch();
        } else {
            this.scriptMaxBatch = 0;
        }
        this.decodePath = why == null ? DecodePath.TORCHSCRIPT : DecodePath.JAVA;
        this.javaPathReason = why;
    }

    /** A single-device decoder whose layers run as {@code path} says (see {@link DecodePath}). */
    public MlaCachedDecoder(DeepSeekForCausalLM model, Device device, ExpertDispatch experts, DecodePath path) {
        this(model, StagePlan.single(Preconditions.checkNotNull(device, "device"), model.config().numHiddenLayers()),
                experts, path);
    }

    /** How this decoder runs its layers: {@link DecodePath#TORCHSCRIPT} or {@link DecodePath#JAVA}. */
    public DecodePath decodePath() {
        return decodePath;
    }

    /** Why the layers take the Java path (the first layer or weight that does not qualify), or null when scripted. */
    public String javaPathReason() {
        return javaPathReason;
    }

    /**
     * How a session of {@code batch} sequences runs its layers ({@link Session#decodePath()}): {@link DecodePath#JAVA}
     * when the decoder takes the Java path, or when {@link DecodePath#AUTO}'s batch policy sends a batch this size to
     * it on a GPU stage; else {@link DecodePath#TORCHSCRIPT}.
     */
    public DecodePath decodePath(int batch) {
        return javaPathReason(batch) == null ? DecodePath.TORCHSCRIPT : DecodePath.JAVA;
    }

    /** Why a session of {@code batch} sequences takes the Java path, or null when it takes the TorchScript step. */
    public String javaPathReason(int batch) {
        if (javaPathReason != null) {
            return javaPathReason;
        }
        for (DecoderStage s : stages) {
            String why = s.sessionJavaReason(batch);
            if (why != null) {
                return why;
            }
        }
        return null;
    }

    /** Stage {@code s} (tests). */
    DecoderStage stage(int s) {
        return stages[s];
    }

    /**
     * The largest batch whose sessions take the TorchScript step on a GPU under {@link DecodePath#AUTO}
     * ({@value DecodePath#SCRIPT_MAX_BATCH_PROPERTY}, read when the decoder was created); 0 on the Java path.
     */
    public int scriptMaxBatch() {
        return scriptMaxBatch;
    }

    /**
     * How this decoder runs routed experts: {@link ExpertDispatch#GATHERED} or {@link ExpertDispatch#SORTED} (the
     * first stage's choice; {@link #expertDispatches()} gives each stage's).
     */
    public ExpertDispatch expertDispatch() {
        return stages[0].expertDispatch();
    }

    /** Each stage's expert dispatch, in stage order. */
    public List<ExpertDispatch> expertDispatches() {
        List<ExpertDispatch> out = new ArrayList<>();
        for (DecoderStage s : stages) {
            out.add(s.expertDispatch());
        }
        return List.copyOf(out);
    }

    /** The model this decoder runs. */
    public DeepSeekForCausalLM model() {
        return model;
    }

    /** The stages this decoder runs. */
    public StagePlan plan() {
        return plan;
    }

    /** The first stage's device: where the generator creates its inputs. */
    @Override
    public Device device() {
        return stages[0].device();
    }

    /** The device the logits are computed and returned on (the last stage's, or the first's with tied embeddings). */
    public Device logitsDevice() {
        return headDevice;
    }

    @Override
    public int vocabSize() {
        return config.vocabSize();
    }

    /** Values this decoder caches per token and layer: {@code kv_lora_rank + qk_rope_head_dim}. */
    public static int cacheValuesPerTokenPerLayer(DeepSeekConfig config) {
        return config.kvLoraRank() + config.qkRopeHeadDim();
    }

    /** What Hugging Face's per-head cache keeps per token and layer: {@code heads * (qk_head_dim + v_head_dim)}. */
    public static int perHeadCacheValuesPerTokenPerLayer(DeepSeekConfig config) {
        return config.numAttentionHeads() * (config.qkHeadDim() + config.vHeadDim());
    }

    /** {@code max_position_embeddings}. */
    @Override
    public int maxLength() {
        return config.maxPositionEmbeddings();
    }

    /** Cache bytes per token over all layers, in the model's data type. */
    @Override
    public long cacheBytesPerToken() {
        long sum = 0;
        for (DecoderStage s : stages) {
            sum += s.cacheBytesPerToken();
        }
        return sum;
    }

    @Override
    public long[] cacheBytesPerTokenByStage() {
        long[] out = new long[stages.length];
        for (int s = 0; s < stages.length; s++) {
            out[s] = stages[s].cacheBytesPerToken();
        }
        return out;
    }

    @Override
    public int logitsStage() {
        for (int s = stages.length - 1; s >= 0; s--) {
            if (stages[s].device().equals(headDevice)) {
                return s;
            }
        }
        return stages.length - 1;
    }

    @Override
    public Session newSession(NDManager manager, int batchSize, int maxLength) {
        Preconditions.checkArgument(batchSize >= 1, "batchSize must be >= 1, got %s", batchSize);
        Preconditions.checkArgument(maxLength >= 1, "maxLength must be >= 1, got %s", maxLength);
        Preconditions.checkArgument(
                maxLength <= config.maxPositionEmbeddings(),
                "prompt + new tokens (%s) exceed max_position_embeddings (%s)", maxLength, config.maxPositionEmbeddings());
        return new Session(manager.newSubManager(device()), batchSize, maxLength);
    }

    /**
     * What crossed between stages in a session: the hidden states handed from one stage to the next (and to the head's
     * device when it is not the last stage's).
     *
     * @param count the transfers
     * @param bytes their bytes
     * @param nanos the time spent issuing them (on the CPU the copies themselves; on a GPU the copies are queued on the
     *     devices' streams, so this is the time to queue them)
     */
    public record Hops(long count, long bytes, long nanos) {}

    /** A decoding session: the cache of one batch, split over the stages. */
    public final class Session implements DecodingSession {
        private final NDManager manager;
        private final int batch;
        private final int maxLength;
        private final DecoderStage.Cache[] caches;
        private int length;
        private long hopCount;
        private long hopBytes;
        private long hopNanos;

        Session(NDManager manager, int batch, int maxLength) {
            this.manager = manager;
            this.batch = batch;
            this.maxLength = maxLength;
            caches = new DecoderStage.Cache[stages.length];
            try {
                for (int s = 0; s < stages.length; s++) {
                    caches[s] = stages[s].new Cache(manager, batch, maxLength);
                }
            } catch (RuntimeException e) {
                manager.close();
                throw e;
            }
        }

        @Override
        public NDArray next(NDArray inputIds, NDArray positionIds, NDArray attentionMask) {
            Shape s = inputIds.getShape();
            Preconditions.checkArgument(s.dimension() == 2 && s.get(0) == batch, "input ids %s, batch %s", s, batch);
            int t = (int) s.get(1);
            int total = length + t;
            Preconditions.checkArgument(total <= maxLength, "session of %s tokens is full (%s + %s)", maxLength, length, t);
            Preconditions.checkArgument(
                    attentionMask.getShape().equals(new Shape(batch, total)),
                    "attention mask %s must be (%s, %s)", attentionMask.getShape(), batch, total);
            NDManager step = inputIds.getManager();
            NDArray result;
            List<NDManager> stageManagers = new ArrayList<>();
            try {
                // ops whose first operand is a weight (the embedding lookup, then the whole residual stream) create
                // their results in the weights' manager: the scope closes every temporary of the step wherever it was
                // created
                try (NDScope scope = new NDScope()) {
                    scope.suppressNotUsedWarning();
                    result = forwardStep(step, stageManagers, inputIds, positionIds, attentionMask, t, total);
                    NDScope.unregister(result);
                }
                // the logits stay on the device that computed them, in a manager of that device under the step's (a
                // manager of another device would create the sampler's temporaries on the wrong device)
                result.attach(step.getDevice().equals(result.getDevice()) ? step
                        : step.newSubManager(result.getDevice()));
            } finally {
                stageManagers.forEach(NDManager::close);
            }
            length = total;
            return result;
        }

        /** The step's manager on {@code device}: the caller's own when it is there, else a sub-manager of it. */
        private NDManager managerOn(NDManager step, List<NDManager> created, Device device) {
            if (step.getDevice().equals(device)) {
                return step;
            }
            NDManager m = step.newSubManager(device);
            created.add(m);
            return m;
        }

        private NDArray forwardStep(NDManager step, List<NDManager> created, NDArray inputIds, NDArray positionIds,
                NDArray attentionMask, int t, int total) {
            NDArray x = inputIds; // the token ids until a stage embeds them, then the hidden state (B, T, hidden)
            boolean isLogits = false;
            for (int s = 0; s < stages.length; s++) {
                Device device = stages[s].device();
                NDManager m = managerOn(step, created, device);
                ParameterStore ps = new ParameterStore(m, false);
                DecoderStage.Cache cache = caches[s];
                NDArray positions = positionIds.toDevice(device, false); // the same array where it already is
                NDArray mask01 = attentionMask.toDevice(device, false);
                if (s > 0) {
                    x = hop(x, m); // (B, T, hidden): the only activation that crosses
                } else if (cache.embedsTokens()) {
                    x = x.toDevice(device, false);
                } else {
                    x = decoder.embedTokens().forward(ps, new NDList(x.toDevice(device, false)), false).head();
                }
                if (cache.isScripted()) {
                    // one call: cos/sin, mask, the layers, and where it qualifies the embedding and the head
                    x = cache.step(m, x, positions, mask01);
                    isLogits = cache.computesLogits();
                } else {
                    NDList cosSin = decoder.rotaryEmb().cosSin(positions); // (B, T, .)
                    NDArray mask = cache.additiveMask(m, mask01, length, t, total);
                    x = cache.forward(ps, x, cosSin, mask, length, t, total);
                }
            }
            if (isLogits) {
                return x; // (B, V)
            }
            NDArray last = x.get(new NDIndex(":, -1:, :")); // (B, 1, hidden)
            NDManager head = managerOn(step, created, headDevice);
            if (!last.getDevice().equals(headDevice)) {
                last = hop(last, head);
            }
            ParameterStore ps = new ParameterStore(head, false);
            NDArray normed = decoder.norm().forward(ps, new NDList(last), false).head();
            NDArray logits = model.logits(ps, normed, false); // (B, 1, V) FP32
            return logits.reshape(batch, logits.getShape().get(2)); // (B, V)
        }

        /**
         * A copy of {@code hidden} on {@code target}'s device, always a copy (on one device too, so the hop is
         * measured), created in {@code target}.
         */
        private NDArray hop(NDArray hidden, NDManager target) {
            // DJL creates a transfer's result in the source's manager, through a new sub-manager of it when that
            // manager is on another device, a sub-manager that lives as long as its parent (the weights' manager
            // here): moved to the target's manager first, the copy is created there and nothing accumulates
            hidden.attach(target);
            long start = System.nanoTime();
            NDArray moved = hidden.toDevice(target.getDevice(), true);
            hopNanos += System.nanoTime() - start;
            hopCount++;
            hopBytes += hidden.size() * hidden.getDataType().getNumOfBytes();
            return moved;
        }

        @Override
        public int length() {
            return length;
        }

        /**
         * How this session runs its layers: {@link DecodePath#TORCHSCRIPT} if every stage takes the TorchScript step,
         * else {@link DecodePath#JAVA} (the decoder's path, or {@link DecodePath#AUTO}'s batch policy on a GPU).
         */
        public DecodePath decodePath() {
            return javaPathReason() == null ? DecodePath.TORCHSCRIPT : DecodePath.JAVA;
        }

        /** Why this session takes the Java path (the decoder's reason or the batch policy's), or null. */
        public String javaPathReason() {
            for (DecoderStage.Cache c : caches) {
                if (!c.isScripted()) {
                    return c.javaReason() != null ? c.javaReason() : MlaCachedDecoder.this.javaPathReason;
                }
            }
            return null;
        }

        /** What crossed between stages so far. */
        public Hops hops() {
            return new Hops(hopCount, hopBytes, hopNanos);
        }

        /** Bytes held by this session's cache buffers, all stages. */
        public long cacheBytes() {
            long bytes = 0;
            for (DecoderStage.Cache c : caches) {
                bytes += c.cacheBytes();
            }
            return bytes;
        }

        /** Bytes held by each stage's cache buffers, in stage order. */
        public long[] cacheBytesByStage() {
            long[] out = new long[caches.length];
            for (int s = 0; s < caches.length; s++) {
                out[s] = caches[s].cacheBytes();
            }
            return out;
        }

        @Override
        public void close() {
            manager.close();
        }
    }
}
