package ai.djl.memopt.model.deepseek;

import ai.djl.Device;
import ai.djl.memopt.nn.FusedAttention;
import ai.djl.memopt.nn.Scalars;
import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;

/**
 * DeepSeek multi-head latent attention (MLA), as Hugging Face's {@code DeepseekV3Attention} / {@code DeepseekV2Attention}
 * in eager mode.
 *
 * <p>Queries go through a low-rank path ({@code q_a_proj -> q_a_layernorm -> q_b_proj}) or a single {@code q_proj} when
 * {@code q_lora_rank} is null. Keys and values share a compressed latent: {@code kv_a_proj_with_mqa} yields
 * {@code kv_lora_rank} latent features plus one shared {@code qk_rope_head_dim} rotary key; the latent goes through
 * {@code kv_a_layernorm -> kv_b_proj} to per-head {@code (k_nope, v)}. Scores use {@code qk_head_dim^-0.5} (times the YaRN
 * mscale correction), a causal mask and an optional padding mask; softmax in FP32. Causal attention without a mask
 * takes PyTorch's fused kernel where {@link FusedAttention#enabled} says so (on a GPU by default).
 *
 * <p>Shapes: inputs {@code hidden (B, T, hidden_size)}, {@code cos}, {@code sin} from {@link RotaryEmbedding#cosSin}, and
 * optionally an additive FP32 mask {@code (B or 1, 1, T, T)} (0 keep, very negative drop; the causal mask is built here
 * when absent); output {@code (B, T, hidden_size)}.
 *
 * <pre>{@code
 * NDList cs = rotary.cosSin(positionIds);
 * NDArray out = attn.forward(ps, new NDList(hidden, cs.get(0), cs.get(1)), training).head();
 * }</pre>
 *
 * <p>The children and dimensions are public so that an absorbed-latent KV cache can reuse the weights; every projection
 * is read through its field, so a decorator put in place by {@code BlockTrees.replaceChild} is the one used.
 */
public final class MultiHeadLatentAttention extends AbstractBlock {

    private static final byte VERSION = 1;

    private final DeepSeekConfig config;
    private final RotaryEmbedding rotary;
    private final int numHeads;
    private final Integer qLoraRank;
    private final int kvLoraRank;
    private final int qkNopeHeadDim;
    private final int qkRopeHeadDim;
    private final int vHeadDim;
    private final float softmaxScale;
    /** Score elements per head group in {@link #attend} on the CPU: 2^20 (4 MB in FP32). */
    private static final long SCORE_ELEMENTS_PER_GROUP = 1L << 20;
    /**
     * System property overriding the score elements per head group on a GPU, where by default all heads are computed
     * at once: there the groups only multiply the kernel launches, and PyTorch's eager attention holds all heads' scores
     * too.
     */
    public static final String GPU_GROUP_PROPERTY = "ai.djl.memopt.attention.gpu_group_elements";

    private Block qAProj;
    private Block qALayernorm;
    private Block qBProj;
    private Block qProj;
    private Block kvAProjWithMqa;
    private Block kvALayernorm;
    private Block kvBProj;
    private Block oProj;

    /**
     * @param config the model config
     * @param rotary the model's shared rotary embedding (not a child: it has no parameters)
     */
    public MultiHeadLatentAttention(DeepSeekConfig config, RotaryEmbedding rotary) {
        super(VERSION);
        this.config = config;
        this.rotary = rotary;
        this.numHeads = config.numAttentionHeads();
        this.qLoraRank = config.qLoraRank().isPresent() ? config.qLoraRank().getAsInt() : null;
        this.kvLoraRank = config.kvLoraRank();
        this.qkNopeHeadDim = config.qkNopeHeadDim();
        this.qkRopeHeadDim = config.qkRopeHeadDim();
        this.vHeadDim = config.vHeadDim();
        this.softmaxScale = (float) config.softmaxScale();
        int qkHeadDim = config.qkHeadDim();
        if (qLoraRank == null) {
            qProj = addChildBlock("q_proj", Projections.linear((long) numHeads * qkHeadDim));
        } else {
            qAProj = addChildBlock("q_a_proj", Projections.linear(qLoraRank));
            qALayernorm = addChildBlock("q_a_layernorm", new RmsNorm(qLoraRank, config.rmsNormEps()));
            qBProj = addChildBlock("q_b_proj", Projections.linear((long) numHeads * qkHeadDim));
        }
        kvAProjWithMqa = addChildBlock("kv_a_proj_with_mqa", Projections.linear(kvLoraRank + qkRopeHeadDim));
        kvALayernorm = addChildBlock("kv_a_layernorm", new RmsNorm(kvLoraRank, config.rmsNormEps()));
        kvBProj = addChildBlock("kv_b_proj", Projections.linear((long) numHeads * (qkNopeHeadDim + vHeadDim)));
        oProj = addChildBlock("o_proj", Projections.linear(config.hiddenSize()));
    }

    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        long h = config.hiddenSize();
        if (qLoraRank == null) {
            Projections.init(qProj, manager, dataType, h);
        } else {
            Projections.init(qAProj, manager, dataType, h);
            qALayernorm.initialize(manager, dataType, new Shape(1, qLoraRank));
            Projections.init(qBProj, manager, dataType, qLoraRank);
        }
        Projections.init(kvAProjWithMqa, manager, dataType, h);
        kvALayernorm.initialize(manager, dataType, new Shape(1, kvLoraRank));
        Projections.init(kvBProj, manager, dataType, kvLoraRank);
        Projections.init(oProj, manager, dataType, (long) numHeads * vHeadDim);
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        NDArray hidden = inputs.get(0);
        NDList cosSin = new NDList(inputs.get(1), inputs.get(2));
        NDArray mask = inputs.size() > 3 ? inputs.get(3) : null;
        return Scoped.run(() -> {
            Shape s = hidden.getShape();
            long b = s.get(0);
            long t = s.get(1);
            NDArray q = queries(ps, hidden, training); // (B, T, H * qk)
            q = q.reshape(b, t, numHeads, qkNopeHeadDim + qkRopeHeadDim).transpose(0, 2, 1, 3); // (B, H, T, qk)
            NDList qSplit = q.split(new long[] {qkNopeHeadDim}, 3);
            NDArray qPass = qSplit.get(0); // (B, H, T, nope)
            NDArray qRot = qSplit.get(1); // (B, H, T, rope)

            NDArray compressed = Projections.call(kvAProjWithMqa, ps, hidden, training); // (B, T, kv_lora + rope)
            NDList kvSplit = compressed.split(new long[] {kvLoraRank}, 2);
            NDArray latent = Projections.call(kvALayernorm, ps, kvSplit.get(0), training); // (B, T, kv_lora)
            NDArray kv = Projections.call(kvBProj, ps, latent, training)
                    .reshape(b, t, numHeads, qkNopeHeadDim + vHeadDim)
                    .transpose(0, 2, 1, 3); // (B, H, T, nope + v)
            NDList kvHeads = kv.split(new long[] {qkNopeHeadDim}, 3);
            NDArray kPass = kvHeads.get(0); // (B, H, T, nope)
            NDArray value = kvHeads.get(1); // (B, H, T, v)
            NDArray kRot = kvSplit.get(1).reshape(b, 1, t, qkRopeHeadDim); // (B, 1, T, rope)

            qRot = rotary.apply(qRot, cosSin);
            kRot = rotary.apply(kRot, cosSin).broadcast(b, numHeads, t, qkRopeHeadDim); // (B, H, T, rope)
            NDArray query = qPass.concat(qRot, -1); // (B, H, T, qk)
            NDArray key = kPass.concat(kRot, -1); // (B, H, T, qk)
            NDArray out = attend(query, key, value, mask); // (B, H, T, v)
            out = out.transpose(0, 2, 1, 3).reshape(b, t, (long) numHeads * vHeadDim); // (B, T, H * v)
            return new NDList(Projections.call(oProj, ps, out, training)); // (B, T, hidden)
        });
    }

    /** Query projection {@code (B, T, hidden) -> (B, T, heads * qk_head_dim)} through whichever path the config has. */
    public NDArray queries(ParameterStore ps, NDArray hidden, boolean training) {
        if (qLoraRank == null) {
            return Projections.call(qProj, ps, hidden, training);
        }
        NDArray a = Projections.call(qAProj, ps, hidden, training);
        NDArray n = Projections.call(qALayernorm, ps, a, training);
        return Projections.call(qBProj, ps, n, training);
    }

    /**
     * Scaled dot-product attention with FP32 softmax: {@code query (B, H, T, d)}, {@code key (B, H, S, d)},
     * {@code value (B, H, S, v)}, additive FP32 {@code mask (B|1, 1, T, S)} or null for a causal mask aligned to the end
     * (query {@code i} sees keys {@code 0..S-T+i}). Returns {@code (B, H, T, v)} in the query's type.
     */
    public NDArray attend(NDArray query, NDArray key, NDArray value, NDArray mask) {
        if (mask == null && query.getShape().get(2) == key.getShape().get(2)
                && FusedAttention.enabled(query.getDevice())) {
            return FusedAttention.causal(query, key, value, softmaxScale); // no (B, H, T, S) scores at all
        }
        long heads = query.getShape().get(1);
        long group = headGroup(heads, query.getShape().get(0), query.getShape().get(2), key.getShape().get(2),
                query.getDevice());
        if (group >= heads) {
            return attendHeads(query, key, value, mask);
        }
        // Heads in groups: each group's (B, g, T, S) scores and, in a training backward, their gradients exist one
        // group at a time (autograd runs the groups' independent branches one after the other) instead of all heads'
        // at once; the per-head arithmetic is unchanged.
        return Scoped.run(() -> {
            NDList outs = new NDList();
            for (long h0 = 0; h0 < heads; h0 += group) {
                NDIndex slice = new NDIndex(":, {}:{}", h0, Math.min(heads, h0 + group));
                outs.add(attendHeads(query.get(slice), key.get(slice), value.get(slice), mask)); // (B, g, T, v)
            }
            NDArray out = NDArrays.concat(outs, 1); // (B, H, T, v)
            outs.close();
            return new NDList(out);
        }).head();
    }

    /**
     * Heads per group of the eager attention of {@code heads} heads, batch {@code b}, {@code t} queries and {@code s}
     * keys on {@code device} (all heads when the group would hold them all); the scripted layer groups the same way.
     */
    static long headGroup(long heads, long b, long t, long s, Device device) {
        long perHead = b * t * s;
        return Math.max(1, Math.min(heads, scoreElementsPerGroup(device) / Math.max(1, perHead)));
    }

    private static long scoreElementsPerGroup(Device device) {
        if (!device.isGpu()) {
            return SCORE_ELEMENTS_PER_GROUP;
        }
        String budget = System.getProperty(GPU_GROUP_PROPERTY);
        return budget == null ? Long.MAX_VALUE : Long.parseLong(budget.trim());
    }

    /** Attention over all heads of the arguments at once (see {@link #attend}). */
    NDArray attendHeads(NDArray query, NDArray key, NDArray value, NDArray mask) {
        return Scoped.run(() -> {
            // Each (B, H, T, S) intermediate is closed as soon as the next one exists: autograd keeps what it saved (the
            // probabilities), so at most two score-sized arrays are alive instead of the whole chain until scope exit.
            NDArray keyT = key.transpose(0, 1, 3, 2);
            NDArray raw = query.matMul(keyT); // (B, H, T, S)
            keyT.close();
            NDArray scores = Scalars.mul(raw, softmaxScale);
            raw.close();
            NDArray s32 = TypeCasts.cast(scores, DataType.FLOAT32);
            closeIfNew(scores, s32);
            NDArray additive = mask != null ? mask : causalMask(query.getManager(), query.getShape().get(2),
                    key.getShape().get(2));
            NDArray onDevice = additive.toDevice(s32.getDevice(), false);
            NDArray masked = s32.add(onDevice);
            s32.close();
            NDArray p32 = masked.softmax(-1);
            masked.close();
            NDArray probs = TypeCasts.cast(p32, query.getDataType()); // (B, H, T, S)
            closeIfNew(p32, probs);
            NDArray out = probs.matMul(value); // (B, H, T, v)
            probs.close();
            return new NDList(out);
        }).head();
    }

    private static void closeIfNew(NDArray previous, NDArray next) {
        if (next != previous) {
            previous.close();
        }
    }

    /** Additive causal mask {@code (1, 1, T, S)}: 0 where key {@code j <= S - T + i}, the most negative float elsewhere. */
    public static NDArray causalMask(NDManager manager, long t, long s) {
        return Scoped.run(() -> {
            NDArray qPos = manager.arange(s - t, s, 1, DataType.INT64).reshape(t, 1); // (T, 1)
            NDArray kPos = manager.arange(0, s, 1, DataType.INT64).reshape(1, s); // (1, S)
            NDArray allowed = qPos.gte(kPos); // (T, S)
            NDArray zeros = manager.zeros(new Shape(t, s), DataType.FLOAT32);
            NDArray neg = manager.full(new Shape(t, s), -Float.MAX_VALUE, DataType.FLOAT32);
            return new NDList(ai.djl.ndarray.NDArrays.where(allowed, zeros, neg).reshape(1, 1, t, s));
        }).head();
    }

    public DeepSeekConfig config() {
        return config;
    }

    public RotaryEmbedding rotary() {
        return rotary;
    }

    public int numHeads() {
        return numHeads;
    }

    /** {@code q_lora_rank}, or {@code -1} when queries use a single {@code q_proj}. */
    public int qLoraRank() {
        return qLoraRank == null ? -1 : qLoraRank;
    }

    public boolean hasQLora() {
        return qLoraRank != null;
    }

    public int kvLoraRank() {
        return kvLoraRank;
    }

    public int qkNopeHeadDim() {
        return qkNopeHeadDim;
    }

    public int qkRopeHeadDim() {
        return qkRopeHeadDim;
    }

    public int vHeadDim() {
        return vHeadDim;
    }

    /** The softmax scale ({@code qk_head_dim^-0.5}, with the YaRN correction when configured). */
    public float softmaxScale() {
        return softmaxScale;
    }

    /** {@code q_a_proj}, or null without q LoRA. */
    public Block qAProj() {
        return qAProj;
    }

    /** {@code q_a_layernorm}, or null without q LoRA. */
    public Block qALayernorm() {
        return qALayernorm;
    }

    /** {@code q_b_proj}, or null without q LoRA. */
    public Block qBProj() {
        return qBProj;
    }

    /** {@code q_proj}, or null with q LoRA. */
    public Block qProj() {
        return qProj;
    }

    public Block kvAProjWithMqa() {
        return kvAProjWithMqa;
    }

    public Block kvALayernorm() {
        return kvALayernorm;
    }

    public Block kvBProj() {
        return kvBProj;
    }

    public Block oProj() {
        return oProj;
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0]};
    }
}
