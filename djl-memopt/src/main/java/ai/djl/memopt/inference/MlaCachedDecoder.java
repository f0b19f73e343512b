package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekDecoderLayer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekMoE;
import ai.djl.memopt.model.deepseek.DeepSeekModel;
import ai.djl.memopt.model.deepseek.MultiHeadLatentAttention;
import ai.djl.memopt.model.deepseek.RotaryEmbedding;
import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.memopt.nn.Scalars;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import com.google.common.base.Preconditions;

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
 * <pre>{@code
 * LanguageModel lm = new MlaCachedDecoder(deepSeekForCausalLM, device);
 * GenerationResult r = new Generator(lm, tokenizer).generate(promptIds, SamplingParams.greedy(64));
 * }</pre>
 */
public final class MlaCachedDecoder implements LanguageModel {

    private final DeepSeekForCausalLM model;
    private final DeepSeekConfig config;
    private final Device device;
    private final DeepSeekModel decoder;
    private final MultiHeadLatentAttention[] attention;
    private final DeepSeekDecoderLayer[] layers;
    private final RotaryEmbedding rotary;
    private final DataType dtype;

    private final ExpertDispatch expertDispatch;

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
        this.model = Preconditions.checkNotNull(model, "model");
        this.device = Preconditions.checkNotNull(device, "device");
        this.config = model.config();
        this.decoder = model.model();
        this.rotary = decoder.rotaryEmb();
        int n = decoder.layers().size();
        this.layers = new DeepSeekDecoderLayer[n];
        this.attention = new MultiHeadLatentAttention[n];
        for (int i = 0; i < n; i++) {
            Block layer = decoder.layers().get(i);
            Preconditions.checkArgument(
                    layer instanceof DeepSeekDecoderLayer,
                    "model.layers.%s is a %s, expected a DeepSeekDecoderLayer", i, layer.getClass().getName());
            layers[i] = (DeepSeekDecoderLayer) layer;
            attention[i] = findAttention(layers[i].selfAttn(), i);
        }
        this.expertDispatch = Preconditions.checkNotNull(experts, "experts").resolve(device);
        for (DeepSeekDecoderLayer layer : layers) {
            Block mlp = BlockDecorator.unwrap(layer.mlp());
            if (mlp instanceof DeepSeekMoE) {
                if (expertDispatch == ExpertDispatch.GATHERED) {
                    // decode steps gather the chosen experts on the device instead of reading their ids
                    ((DeepSeekMoE) mlp).enableGatheredDispatch();
                } else {
                    ((DeepSeekMoE) mlp).disableGatheredDispatch();
                }
            }
        }
        this.dtype = model.dataType();
    }

    /** The attention block itself, or the one inside a decorator that took its place. */
    private static MultiHeadLatentAttention findAttention(Block selfAttn, int layer) {
        if (selfAttn instanceof MultiHeadLatentAttention) {
            return (MultiHeadLatentAttention) selfAttn;
        }
        for (Block b : BlockTrees.walk(selfAttn).values()) {
            if (b instanceof MultiHeadLatentAttention) {
                return (MultiHeadLatentAttention) b;
            }
        }
        throw new IllegalArgumentException(
                "model.layers." + layer + ".self_attn (" + selfAttn.getClass().getName() + ") holds no MultiHeadLatentAttention");
    }

    /** How this decoder runs routed experts: {@link ExpertDispatch#GATHERED} or {@link ExpertDispatch#SORTED}. */
    public ExpertDispatch expertDispatch() {
        return expertDispatch;
    }

    @Override
    public Device device() {
        return device;
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
        return (long) cacheValuesPerTokenPerLayer(config) * layers.length * dtype.getNumOfBytes();
    }

    @Override
    public Session newSession(NDManager manager, int batchSize, int maxLength) {
        Preconditions.checkArgument(batchSize >= 1, "batchSize must be >= 1, got %s", batchSize);
        Preconditions.checkArgument(maxLength >= 1, "maxLength must be >= 1, got %s", maxLength);
        Preconditions.checkArgument(
                maxLength <= config.maxPositionEmbeddings(),
                "prompt + new tokens (%s) exceed max_position_embeddings (%s)", maxLength, config.maxPositionEmbeddings());
        return new Session(manager.newSubManager(device), batchSize, maxLength);
    }

    /** A decoding session: the cache of one batch. */
    public final class Session implements DecodingSession {
        private final NDManager manager;
        private final int batch;
        private final int maxLength;
        private final NDArray[] latent; // per layer (B, maxLength, r)
        private final NDArray[] ropeKey; // per layer (B, maxLength, rope)
        private final NDArray[] wUk; // per layer (1, H, nope, r)
        private final NDArray[] wUvT; // per layer (1, H, r, v)
        private final NDArray paddingBias; // (B, 1, 1, maxLength) FP32: 0 for tokens, the lowest float for padding
        private int length;

        Session(NDManager manager, int batch, int maxLength) {
            this.manager = manager;
            this.batch = batch;
            this.maxLength = maxLength;
            int n = layers.length;
            latent = new NDArray[n];
            ropeKey = new NDArray[n];
            wUk = new NDArray[n];
            wUvT = new NDArray[n];
            try {
                paddingBias = manager.zeros(new Shape(batch, 1, 1, maxLength), DataType.FLOAT32);
                int r = config.kvLoraRank();
                int rope = config.qkRopeHeadDim();
                int h = config.numAttentionHeads();
                int nope = config.qkNopeHeadDim();
                int v = config.vHeadDim();
                for (int i = 0; i < n; i++) {
                    latent[i] = manager.zeros(new Shape(batch, maxLength, r), dtype);
                    ropeKey[i] = manager.zeros(new Shape(batch, maxLength, rope), dtype);
                    try (NDManager scratch = manager.newSubManager()) {
                        NDArray w = LinearWeightSource.weightOf(attention[i].kvBProj(), scratch); // (H (nope + v), r)
                        if (w.getManager() != scratch) {
                            // a plain Linear hands out its parameter: derive views of it without adopting it
                            w.tempAttach(scratch);
                        }
                        Preconditions.checkState(
                                w.getShape().equals(new Shape((long) h * (nope + v), r)),
                                "model.layers.%s.self_attn.kv_b_proj weight is %s, expected (%s, %s)",
                                i, w.getShape(), (long) h * (nope + v), r);
                        NDArray heads = w.toDevice(device, false).toType(dtype, false).reshape(h, nope + v, r);
                        // views share the weight's storage (no copy for a plain Linear); they move to the session
                        wUk[i] = heads.get(new NDIndex(":, :{}, :", nope)).reshape(1, h, nope, r);
                        wUvT[i] = heads.get(new NDIndex(":, {}:, :", nope)).transpose(0, 2, 1).reshape(1, h, r, v);
                        wUk[i].attach(manager);
                        wUvT[i].attach(manager);
                    }
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
            // ops whose first operand is a weight (the embedding lookup, then the whole residual stream) create their
            // results in the weights' manager: the scope closes every temporary of the step wherever it was created
            try (NDScope scope = new NDScope()) {
                scope.suppressNotUsedWarning();
                result = forwardStep(step, inputIds, positionIds, attentionMask, t, total);
                NDScope.unregister(result);
            }
            result.attach(step);
            length = total;
            return result;
        }

        private NDArray forwardStep(NDManager step, NDArray inputIds, NDArray positionIds, NDArray attentionMask, int t, int total) {
            ParameterStore ps = new ParameterStore(step, false);
            NDList cosSin = rotary.cosSin(positionIds); // (B, T, .)
            NDArray mask = additiveMask(step, attentionMask, t, total); // (B, 1, T, S) FP32
            NDArray hidden = decoder.embedTokens().forward(ps, new NDList(inputIds), false).head(); // (B, T, hidden)
            for (int i = 0; i < layers.length; i++) {
                DeepSeekDecoderLayer layer = layers[i];
                NDArray normed = layer.inputLayernorm().forward(ps, new NDList(hidden), false).head();
                NDArray attn = attend(i, ps, normed, cosSin, mask, t, total); // (B, T, hidden)
                NDArray h = hidden.add(attn);
                NDArray normed2 = layer.postAttentionLayernorm().forward(ps, new NDList(h), false).head();
                hidden = h.add(layer.mlp().forward(ps, new NDList(normed2), false).head()); // (B, T, hidden)
            }
            NDArray last = hidden.get(new NDIndex(":, -1:, :")); // (B, 1, hidden)
            NDArray normed = decoder.norm().forward(ps, new NDList(last), false).head();
            NDArray logits = model.logits(ps, normed, false); // (B, 1, V) FP32
            return logits.reshape(batch, logits.getShape().get(2)); // (B, V)
        }

        private NDArray attend(int i, ParameterStore ps, NDArray x, NDList cosSin, NDArray mask, int t, int total) {
            MultiHeadLatentAttention a = attention[i];
            int h = a.numHeads();
            int nope = a.qkNopeHeadDim();
            int rope = a.qkRopeHeadDim();
            int r = a.kvLoraRank();
            int v = a.vHeadDim();
            NDArray q = a.queries(ps, x, false).reshape(batch, t, h, nope + rope).transpose(0, 2, 1, 3); // (B, H, T, qk)
            NDArray qNope = q.get(new NDIndex(":, :, :, :{}", nope)); // (B, H, T, nope)
            NDArray qPe = rotary.apply(q.get(new NDIndex(":, :, :, {}:", nope)), cosSin); // (B, H, T, rope)

            NDArray compressed = a.kvAProjWithMqa().forward(ps, new NDList(x), false).head(); // (B, T, r + rope)
            NDArray c = a.kvALayernorm().forward(ps, new NDList(compressed.get(new NDIndex(":, :, :{}", r))), false).head();
            NDArray kPe = compressed.get(new NDIndex(":, :, {}:", r)).reshape(batch, 1, t, rope); // (B, 1, T, rope)
            kPe = rotary.apply(kPe, cosSin).reshape(batch, t, rope); // (B, T, rope)
            NDIndex slot = new NDIndex(":, {}:{}, :", length, total);
            latent[i].set(slot, c.toType(dtype, false)); // in place: the cache is never re-concatenated
            ropeKey[i].set(slot, kPe.toType(dtype, false));

            NDIndex prefix = new NDIndex(":, :{}, :", total);
            NDArray cKv = latent[i].get(prefix); // (B, S, r)
            NDArray kRope = ropeKey[i].get(prefix); // (B, S, rope)
            // views of the cache are created in the session's manager; the step's scope closes them
            cKv = cKv.expandDims(1); // (B, 1, S, r)
            kRope = kRope.expandDims(1); // (B, 1, S, rope)

            NDArray qLatent = qNope.matMul(wUk[i]); // (B, H, T, r)
            // the scale as a device scalar: a host number would be uploaded, a blocking copy on a GPU, in every layer
            NDArray scores = Scalars.mul(qLatent.matMul(cKv.transpose(0, 1, 3, 2))
                    .add(qPe.matMul(kRope.transpose(0, 1, 3, 2))), a.softmaxScale()); // (B, H, T, S)
            NDArray probs = scores.toType(DataType.FLOAT32, false).add(mask).softmax(-1).toType(dtype, false);
            NDArray outLatent = probs.matMul(cKv); // (B, H, T, r)
            NDArray out = outLatent.matMul(wUvT[i]); // (B, H, T, v)
            out = out.transpose(0, 2, 1, 3).reshape(batch, t, (long) h * v); // (B, T, H v)
            return a.oProj().forward(ps, new NDList(out), false).head(); // (B, T, hidden)
        }

        /** (B, 1, T, S) FP32: 0 where query {@code i} (at cache index S - T + i) may see key j, else the lowest float. */
        private NDArray additiveMask(NDManager m, NDArray attentionMask, int t, int total) {
            // the padding bias of the past is kept: only the new columns are converted and written
            // constants as device scalars (Scalars), not host numbers uploaded at every step
            NDArray newColumns = attentionMask.get(new NDIndex(":, {}:", length)); // (B, T)
            NDArray fresh = newColumns.eq(Scalars.like(newColumns, 0)).toType(DataType.FLOAT32, false); // (B, T)
            paddingBias.set(
                    new NDIndex(":, :, :, {}:{}", length, total), Scalars.mul(fresh, -Float.MAX_VALUE).reshape(batch, 1, 1, t));
            NDArray padding = paddingBias.get(new NDIndex(":, :, :, :{}", total)); // (B, 1, 1, S)
            if (t == 1) {
                return padding; // one new token sees the whole past: no causal part
            }
            NDArray causal = MultiHeadLatentAttention.causalMask(m, t, total).toDevice(device, false); // (1, 1, T, S)
            return NDArrays.minimum(causal, padding); // (B, 1, T, S); min, as adding would overflow to -inf
        }

        @Override
        public int length() {
            return length;
        }

        /** Bytes held by this session's cache buffers. */
        public long cacheBytes() {
            long bytes = 0;
            for (int i = 0; i < latent.length; i++) {
                bytes += latent[i].size() * dtype.getNumOfBytes() + ropeKey[i].size() * dtype.getNumOfBytes();
            }
            return bytes;
        }

        @Override
        public void close() {
            manager.close();
        }
    }
}
