package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.inference.ScriptedStepSource.Ends;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekDecoderLayer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekMlp;
import ai.djl.memopt.model.deepseek.DeepSeekMoE;
import ai.djl.memopt.model.deepseek.DeepSeekModel;
import ai.djl.memopt.model.deepseek.MoeGate;
import ai.djl.memopt.model.deepseek.MultiHeadLatentAttention;
import ai.djl.memopt.model.deepseek.RmsNorm;
import ai.djl.memopt.model.deepseek.TokenEmbedding;
import ai.djl.memopt.nn.HostReads;
import ai.djl.memopt.nn.TorchScriptArchive;
import ai.djl.memopt.nn.TorchScriptModules;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.engine.PtNDManager;
import ai.djl.pytorch.engine.PtSymbolBlock;
import ai.djl.pytorch.jni.IValue;
import com.google.common.base.Preconditions;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * One stage's decode step (all its layers, prefill or decode, batch {@code B}) as a single TorchScript call: libtorch
 * dispatches each operation in C++ instead of one Java and JNI round trip per DJL operation, which is what bounds a
 * decode step on a GPU (about 1,100 DJL operations per token for bench-small). The script is generated from the config
 * ({@link ScriptedStepSource}), written as a TorchScript archive ({@link TorchScriptArchive}) and compiled by libtorch
 * when loaded, once per process and source: no Python anywhere.
 *
 * <p>Only plain layers qualify ({@link #unsupportedReason}): the model's own blocks, undecorated, with plain bias-free
 * {@code Linear} projections, MoE experts stacked by {@link DeepSeekMoE#plainExpertStacks()}, all weights of the
 * decoder's type (FP32 or FP16) on the stage's device. Quantized, LoRA or decorated layers keep the Java path.
 *
 * <p>The cache buffers, absorbed weights and padding bias are the session's ({@code DecoderStage.Cache}); the script
 * writes the cache and the padding bias in place. The weights are passed as tensor arguments (lists built once per
 * session, sharing the parameters' storage). A step's call takes three arrays: the token ids (or the hidden state from
 * the previous stage), the position ids and the 0/1 attention mask; it computes the rotary cos/sin and the additive
 * mask itself, and where they qualify ({@link #create}) the first stage's call looks the ids up in the embedding table
 * and the last stage's applies the final norm and the head to the last position, returning the logits. A batch-1
 * decode step on one device is then one TorchScript call between the generator's inputs and its sampler.
 */
final class ScriptedStage {

    private final DeepSeekConfig config;
    private final DeepSeekDecoderLayer[] layers;
    private final MultiHeadLatentAttention[] attention;
    private final Device device;
    private final DeepSeekModel decoder;
    private final Block lmHead;
    private final Ends ends;
    private final PtSymbolBlock module;

    private ScriptedStage(DeepSeekForCausalLM model, DeepSeekDecoderLayer[] layers,
            MultiHeadLatentAttention[] attention, Device device, Ends ends) {
        this.config = model.config();
        this.layers = layers;
        this.attention = attention;
        this.device = device;
        this.decoder = model.model();
        this.lmHead = model.lmHead();
        this.ends = ends;
        List<Boolean> moe = new ArrayList<>();
        for (DeepSeekDecoderLayer layer : layers) {
            moe.add(layer.mlp() instanceof DeepSeekMoE);
        }
        this.module = TorchScriptModules.load(ScriptedStepSource.CLASS, ScriptedStepSource.classBody(config, moe, ends));
    }

    /**
     * The scripted step of a stage.
     *
     * @param model the model the layers are of: its embedding, final norm and head join the call where {@code first}
     *     or {@code last} says so and they qualify ({@link #ends}); otherwise they stay in Java
     * @param first the stage takes the token ids (the first stage)
     * @param last the stage computes the logits (the stage on the final norm's device)
     * @throws IllegalArgumentException if {@link #unsupportedReason} is not null
     */
    static ScriptedStage create(DeepSeekForCausalLM model, DeepSeekDecoderLayer[] layers,
            MultiHeadLatentAttention[] attention, DataType dtype, Device device, int firstLayer, boolean first,
            boolean last) {
        DeepSeekConfig config = model.config();
        String why = unsupportedReason(config, layers, attention, dtype, device, firstLayer);
        Preconditions.checkArgument(why == null, "the TorchScript decode step cannot run this model: %s", why);
        Checker c = new Checker(config, dtype, device);
        DeepSeekModel decoder = model.model();
        Block table = decoder.embedTokens();
        boolean embed = first && table.getClass() == TokenEmbedding.class
                && c.array(((TokenEmbedding) table).weight(), "model.embed_tokens.weight", false) == null;
        boolean tied = model.lmHead() == null;
        boolean head = last && c.norm(decoder.norm(), "model.norm") == null && (tied
                ? c.array(decoder.tokenEmbedding().weight(), "model.embed_tokens.weight", false) == null
                : c.linear(model.lmHead(), "lm_head") == null);
        return new ScriptedStage(model, layers.clone(), attention.clone(), device, new Ends(embed, head, tied));
    }

    /** What the call does besides the layers: whether it looks up the token ids and computes the logits. */
    Ends ends() {
        return ends;
    }

    /**
     * Why a stage's layers cannot take the scripted step, or null if they can: the first layer or weight that is not
     * plain, naming it.
     */
    static String unsupportedReason(DeepSeekConfig config, DeepSeekDecoderLayer[] layers,
            MultiHeadLatentAttention[] attention, DataType dtype, Device device, int firstLayer) {
        if (dtype != DataType.FLOAT32 && dtype != DataType.FLOAT16) {
            return "the model's type is " + dtype + " (FP32 or FP16 only)";
        }
        Checker c = new Checker(config, dtype, device);
        for (int i = 0; i < layers.length; i++) {
            String at = "model.layers." + (firstLayer + i) + ".";
            DeepSeekDecoderLayer layer = layers[i];
            if (layer.getClass() != DeepSeekDecoderLayer.class) {
                return at + " is a " + layer.getClass().getName();
            }
            if (layer.selfAttn() != attention[i] || attention[i].getClass() != MultiHeadLatentAttention.class) {
                return at + "self_attn is decorated (" + layer.selfAttn().getClass().getName() + ")";
            }
            MultiHeadLatentAttention a = attention[i];
            String why = c.norm(layer.inputLayernorm(), at + "input_layernorm");
            why = why != null ? why : c.norm(layer.postAttentionLayernorm(), at + "post_attention_layernorm");
            if (a.hasQLora()) {
                why = why != null ? why : c.linear(a.qAProj(), at + "self_attn.q_a_proj");
                why = why != null ? why : c.norm(a.qALayernorm(), at + "self_attn.q_a_layernorm");
                why = why != null ? why : c.linear(a.qBProj(), at + "self_attn.q_b_proj");
            } else {
                why = why != null ? why : c.linear(a.qProj(), at + "self_attn.q_proj");
            }
            why = why != null ? why : c.linear(a.kvAProjWithMqa(), at + "self_attn.kv_a_proj_with_mqa");
            why = why != null ? why : c.norm(a.kvALayernorm(), at + "self_attn.kv_a_layernorm");
            why = why != null ? why : c.linear(a.kvBProj(), at + "self_attn.kv_b_proj");
            why = why != null ? why : c.linear(a.oProj(), at + "self_attn.o_proj");
            if (why == null && a.softmaxScale() != (float) config.softmaxScale()) {
                why = at + "self_attn's softmax scale " + a.softmaxScale() + " is not the config's";
            }
            why = why != null ? why : c.mlp(layer.mlp(), at + "mlp");
            if (why != null) {
                return why;
            }
        }
        return null;
    }

    /** The checks of {@link #unsupportedReason}, per block kind. */
    private static final class Checker {
        private final DeepSeekConfig config;
        private final DataType dtype;
        private final Device device;

        Checker(DeepSeekConfig config, DataType dtype, Device device) {
            this.config = config;
            this.dtype = dtype;
            this.device = device;
        }

        String array(Parameter p, String name, boolean anyFloat) {
            if (p == null || !p.isInitialized()) {
                return name + " is not initialised";
            }
            NDArray a = p.getArray();
            if (!(a instanceof PtNDArray)) {
                return name + " is not a PyTorch array";
            }
            boolean typeOk = anyFloat ? a.getDataType().isFloating() : a.getDataType() == dtype;
            if (!typeOk) {
                return name + " is " + a.getDataType() + ", the decoder runs in " + dtype;
            }
            return a.getDevice().equals(device) ? null : name + " is on " + a.getDevice() + ", the stage on " + device;
        }

        String linear(Block b, String name) {
            if (b == null || b.getClass() != Linear.class) {
                return name + " is a " + (b == null ? "missing block" : b.getClass().getName()) + ", not a plain Linear";
            }
            if (b.getParameters().size() != 1) {
                return name + " has a bias";
            }
            return array(b.getParameters().get("weight"), name + ".weight", false);
        }

        String norm(Block b, String name) {
            if (b == null || b.getClass() != RmsNorm.class) {
                return name + " is a " + (b == null ? "missing block" : b.getClass().getName()) + ", not an RmsNorm";
            }
            if (((RmsNorm) b).eps() != (float) config.rmsNormEps()) {
                return name + " eps " + ((RmsNorm) b).eps() + " is not the config's " + config.rmsNormEps();
            }
            return array(((RmsNorm) b).weight(), name + ".weight", false);
        }

        String swiglu(Block b, String name) {
            if (b == null || b.getClass() != DeepSeekMlp.class) {
                return name + " is a " + (b == null ? "missing block" : b.getClass().getName()) + ", not a DeepSeekMlp";
            }
            DeepSeekMlp m = (DeepSeekMlp) b;
            String why = linear(m.gateProj(), name + ".gate_proj");
            why = why != null ? why : linear(m.upProj(), name + ".up_proj");
            return why != null ? why : linear(m.downProj(), name + ".down_proj");
        }

        String mlp(Block b, String name) {
            if (b.getClass() != DeepSeekMoE.class) {
                return swiglu(b, name);
            }
            DeepSeekMoE moe = (DeepSeekMoE) b;
            if (moe.gate().getClass() != MoeGate.class) {
                return name + ".gate is a " + moe.gate().getClass().getName();
            }
            MoeGate gate = (MoeGate) moe.gate();
            String why = array(gate.weight(), name + ".gate.weight", true);
            if (why == null && gate.correctionBias() != null) {
                why = array(gate.correctionBias(), name + ".gate.e_score_correction_bias", true);
            }
            if (why == null && (config.nSharedExperts() > 0) != (moe.sharedExperts() != null)) {
                why = name + ".shared_experts does not match n_shared_experts";
            }
            if (why == null && moe.sharedExperts() != null) {
                why = swiglu(moe.sharedExperts(), name + ".shared_experts");
            }
            for (int e = 0; why == null && e < moe.experts().size(); e++) {
                why = swiglu(moe.experts().get(e), name + ".experts." + e);
            }
            if (why == null && moe.experts().size() != config.nRoutedExperts()) {
                why = name + " has " + moe.experts().size() + " experts, the config " + config.nRoutedExperts();
            }
            return why;
        }
    }

    /** The stage's weights in {@link ScriptedStepSource}'s order, stacking MoE experts if needed. */
    private List<PtNDArray> weights() {
        List<PtNDArray> w = new ArrayList<>();
        for (int i = 0; i < layers.length; i++) {
            DeepSeekDecoderLayer layer = layers[i];
            MultiHeadLatentAttention a = attention[i];
            w.add(normWeight(layer.inputLayernorm()));
            if (a.hasQLora()) {
                w.add(linearWeight(a.qAProj()));
                w.add(normWeight(a.qALayernorm()));
                w.add(linearWeight(a.qBProj()));
            } else {
                w.add(linearWeight(a.qProj()));
            }
            w.add(linearWeight(a.kvAProjWithMqa()));
            w.add(normWeight(a.kvALayernorm()));
            w.add(linearWeight(a.oProj()));
            w.add(normWeight(layer.postAttentionLayernorm()));
            if (layer.mlp() instanceof DeepSeekMoE) {
                DeepSeekMoE moe = (DeepSeekMoE) layer.mlp();
                MoeGate gate = (MoeGate) moe.gate();
                w.add((PtNDArray) gate.weight().getArray());
                if (config.isV3()) {
                    w.add((PtNDArray) gate.correctionBias().getArray());
                }
                List<NDArray> stacks = moe.plainExpertStacks();
                Preconditions.checkState(stacks != null, "model.layers.%s.mlp.experts cannot be stacked",
                        layer.index());
                stacks.forEach(s -> w.add((PtNDArray) s));
                if (moe.sharedExperts() != null) {
                    swigluWeights((DeepSeekMlp) moe.sharedExperts(), w);
                }
            } else {
                swigluWeights((DeepSeekMlp) layer.mlp(), w);
            }
        }
        return w;
    }

    private static void swigluWeights(DeepSeekMlp m, List<PtNDArray> w) {
        w.add(linearWeight(m.gateProj()));
        w.add(linearWeight(m.upProj()));
        w.add(linearWeight(m.downProj()));
    }

    private static PtNDArray linearWeight(Block linear) {
        return (PtNDArray) linear.getParameters().get("weight").getArray();
    }

    private static PtNDArray normWeight(Block norm) {
        return (PtNDArray) ((RmsNorm) norm).weight().getArray();
    }

    /** Stacks the MoE layers' experts now (at decoder creation), so that no session pays for it. */
    void prepare() {
        weights();
    }

    /**
     * The session's arguments that do not change between steps: the rotary inverse frequencies, the padding bias, the
     * weights and the cache buffers, as TorchScript lists holding references to the same tensors (no copy).
     *
     * @param invFreq the rotary inverse frequencies {@code (d/2)} FP32 on the stage's device
     * @param paddingBias the session's {@code (B, 1, 1, maxLength)} FP32 padding bias, written by the calls
     */
    Bound bind(NDArray invFreq, NDArray paddingBias, NDArray[] latent, NDArray[] ropeKey, NDArray[] wUk,
            NDArray[] wUvT) {
        // read now, as the layers' weights: a session uses the arrays the blocks hold when it starts
        List<NDArray> fixed = new ArrayList<>(List.of(invFreq, paddingBias));
        if (ends.embed()) {
            fixed.add(((TokenEmbedding) decoder.embedTokens()).weight().getArray());
        }
        if (ends.head()) {
            fixed.add(normWeight(decoder.norm()));
            fixed.add(ends.tied() ? decoder.tokenEmbedding().weight().getArray() : linearWeight(lmHead));
        }
        return new Bound(fixed.toArray(new NDArray[0]), weights(), latent, ropeKey, wUk, wUvT);
    }

    /** A session's fixed arguments; closing releases the lists (the tensors stay with their owners). */
    final class Bound implements AutoCloseable {
        private final IValue fixed;
        private final IValue weights;
        private final IValue latent;
        private final IValue ropeKey;
        private final IValue wUk;
        private final IValue wUvT;
        private final DeepSeekMoE[] moes; // per layer, null for dense
        private final long[] chunk; // per MoE layer: assignments per gathered chunk
        private long[] lastChunks; // the chunks of the last call, and their list (decode steps reuse it)
        private IValue lastChunksList;

        Bound(NDArray[] fixed, List<PtNDArray> weights, NDArray[] latent, NDArray[] ropeKey, NDArray[] wUk,
                NDArray[] wUvT) {
            this.fixed = list(fixed);
            this.weights = IValue.listFrom(weights.toArray(new PtNDArray[0]));
            this.latent = list(latent);
            this.ropeKey = list(ropeKey);
            this.wUk = list(wUk);
            this.wUvT = list(wUvT);
            moes = new DeepSeekMoE[layers.length];
            chunk = new long[layers.length];
            for (int i = 0; i < layers.length; i++) {
                if (layers[i].mlp() instanceof DeepSeekMoE) {
                    moes[i] = (DeepSeekMoE) layers[i].mlp();
                    long largest = 0;
                    for (NDArray s : moes[i].plainExpertStacks()) {
                        largest = Math.max(largest, s.getShape().get(1) * s.getShape().get(2));
                    }
                    chunk[i] = Math.max(1, moes[i].gatherChunkBytes() / (largest * 4));
                }
            }
        }

        private IValue list(NDArray[] arrays) {
            PtNDArray[] pt = new PtNDArray[arrays.length];
            for (int i = 0; i < arrays.length; i++) {
                pt[i] = (PtNDArray) arrays[i];
            }
            return IValue.listFrom(pt);
        }

        /**
         * One step of the stage, as {@code DecoderStage.Cache.forward} and the Java parts of the session around it
         * (cos/sin, mask, and as {@link #ends()} says, the embedding lookup and the head), writing the stage's cache at
         * {@code [length, total)}.
         *
         * @param out the manager of the result
         * @param input the token ids {@code (B, T)} if the call embeds them, else the hidden state {@code (B, T, hidden)}
         * @param positions {@code (B, T)} INT64 position ids on the stage's device
         * @param attentionMask {@code (B, total)} 0/1 on the stage's device
         * @return the logits {@code (B, V)} FP32 if the call ends with the head, else the hidden state
         */
        NDArray forward(NDManager out, NDArray input, NDArray positions, NDArray attentionMask) {
            long assignments = positions.getShape().size() * config.numExpertsPerTok();
            long[] chunks = new long[layers.length];
            int sorted = 0;
            for (int i = 0; i < layers.length; i++) {
                // the Java path's choice: gathered when enabled and within the limit (0 here: the sorted dispatch)
                DeepSeekMoE moe = moes[i];
                boolean gathered = moe != null && moe.isGatheredDispatchEnabled()
                        && assignments <= moe.gatheredDispatchLimit(device);
                chunks[i] = gathered ? chunk[i] : 0;
                sorted += moe != null && !gathered ? 1 : 0;
            }
            HostReads.recordNative(sorted); // the sorted dispatch reads its expert counts once per MoE layer
            if (!Arrays.equals(chunks, lastChunks)) {
                if (lastChunksList != null) {
                    lastChunksList.close();
                }
                lastChunksList = IValue.listFrom(chunks);
                lastChunks = chunks;
            }
            // three arguments per step; the rest are the session's
            IValue[] step = new IValue[3];
            try {
                step[0] = IValue.from((PtNDArray) input);
                step[1] = IValue.from((PtNDArray) positions);
                step[2] = IValue.from((PtNDArray) attentionMask);
                IValue[] args = {step[0], step[1], step[2], fixed, weights, latent, ropeKey, wUk, wUvT, lastChunksList};
                try (IValue result = module.forward(args)) {
                    return result.toTensor((PtNDManager) out);
                }
            } finally {
                for (IValue v : step) {
                    if (v != null) {
                        v.close();
                    }
                }
            }
        }

        @Override
        public void close() {
            if (lastChunksList != null) {
                lastChunksList.close();
            }
            fixed.close();
            weights.close();
            latent.close();
            ropeKey.close();
            wUk.close();
            wUvT.close();
        }
    }
}
