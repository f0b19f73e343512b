package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekDecoderLayer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekMoE;
import ai.djl.memopt.model.deepseek.MultiHeadLatentAttention;
import ai.djl.memopt.model.deepseek.RotaryEmbedding;
import ai.djl.memopt.nn.BlockDecorator;
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
 * The decoder layers of one {@link StagePlan.Stage} and their part of a session's compressed MLA cache, all on the
 * stage's device: {@link MlaCachedDecoder} runs its stages in order and moves the hidden state between them.
 */
final class DecoderStage {

    private final DeepSeekConfig config;
    private final Device device;
    private final int firstLayer;
    private final DeepSeekDecoderLayer[] layers;
    private final MultiHeadLatentAttention[] attention;
    private final RotaryEmbedding rotary;
    private final DataType dtype;
    private final ExpertDispatch expertDispatch;
    private ScriptedStage scripted; // null: the Java path
    private ScriptBatchPolicy policy; // which sessions take the script

    DecoderStage(DeepSeekConfig config, Device device, int firstLayer, DeepSeekDecoderLayer[] layers,
            MultiHeadLatentAttention[] attention, RotaryEmbedding rotary, DataType dtype, ExpertDispatch experts) {
        this.config = config;
        this.device = device;
        this.firstLayer = firstLayer;
        this.layers = layers.clone();
        this.attention = attention.clone();
        this.rotary = rotary;
        this.dtype = dtype;
        this.expertDispatch = experts.resolve(device);
        for (DeepSeekDecoderLayer layer : this.layers) {
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
    }

    Device device() {
        return device;
    }

    ExpertDispatch expertDispatch() {
        return expertDispatch;
    }

    /** Why this stage's layers cannot take the TorchScript step, or null if they can. */
    String scriptUnsupportedReason() {
        return ScriptedStage.unsupportedReason(config, layers, attention, dtype, device, firstLayer);
    }

    /**
     * Runs this stage's later sessions through the TorchScript step where {@code policy} lets them
     * ({@link #scriptUnsupportedReason()} is null).
     *
     * @param first the stage takes the token ids: the step embeds them if the embedding qualifies
     * @param last the stage computes the logits: the step applies the final norm and head if they qualify
     */
    void useScript(DeepSeekForCausalLM model, boolean first, boolean last, ScriptBatchPolicy policy) {
        ScriptedStage s = ScriptedStage.create(model, layers, attention, dtype, device, firstLayer, first, last);
        s.prepare();
        scripted = s;
        this.policy = policy;
    }

    boolean isScripted() {
        return scripted != null;
    }

    /** What the stage's TorchScript call does besides the layers, or null on the Java path. */
    ScriptedStepSource.Ends scriptEnds() {
        return scripted == null ? null : scripted.ends();
    }

    /** Why a session of {@code batch} sequences runs this stage on the Java path, or null if it takes the script. */
    String sessionJavaReason(int batch) {
        return scripted == null ? "the stage is not scripted" : policy.javaReason(device, batch);
    }

    /** Called after each layer of a Java-path forward with its index (a test seam: arrays alive between layers). */
    java.util.function.IntConsumer afterLayer;

    /** Sets which sessions take the script (tests: a policy that treats the CPU as a GPU). */
    void setPolicy(ScriptBatchPolicy policy) {
        this.policy = policy;
    }

    int layerCount() {
        return layers.length;
    }

    /** Cache bytes per token of this stage's layers. */
    long cacheBytesPerToken() {
        return (long) MlaCachedDecoder.cacheValuesPerTokenPerLayer(config) * layers.length * dtype.getNumOfBytes();
    }

    /** This stage's part of a session: its layers' cache, the absorbed weights and the padding bias. */
    final class Cache implements AutoCloseable {
        private final NDManager manager;
        private final int batch;
        private final NDArray[] latent; // per layer (B, maxLength, r)
        private final NDArray[] ropeKey; // per layer (B, maxLength, rope)
        private final NDArray[] wUk; // per layer (1, H, nope, r)
        private final NDArray[] wUvT; // per layer (1, H, r, v)
        private final NDArray paddingBias; // (B, 1, 1, maxLength) FP32: 0 for tokens, the lowest float for padding
        private final ScriptedStage.Bound script; // null: the Java path
        private final String javaReason; // why a scripted stage's session takes the Java path, else null

        Cache(NDManager session, int batch, int maxLength) {
            this.manager = session.newSubManager(device);
            this.batch = batch;
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
                                firstLayer + i, w.getShape(), (long) h * (nope + v), r);
                        NDArray heads = w.toDevice(device, false).toType(dtype, false).reshape(h, nope + v, r);
                        // views share the weight's storage (no copy for a plain Linear); they move to the session
                        wUk[i] = heads.get(new NDIndex(":, :{}, :", nope)).reshape(1, h, nope, r);
                        wUvT[i] = heads.get(new NDIndex(":, {}:, :", nope)).transpose(0, 2, 1).reshape(1, h, r, v);
                        wUk[i].attach(manager);
                        wUvT[i].attach(manager);
                    }
                }
                // the policy decides per session: on a GPU, the script for small batches only
                javaReason = scripted == null ? null : sessionJavaReason(batch);
                script = scripted == null || javaReason != null ? null : scripted.bind(
                        manager.create(rotary.inverseFrequencies()), paddingBias, latent, ropeKey, wUk, wUvT);
            } catch (RuntimeException e) {
                manager.close();
                throw e;
            }
        }

        /** Whether this session's step runs this stage as one TorchScript call ({@link #step}). */
        boolean isScripted() {
            return script != null;
        }

        /** Why this session runs a scriptable stage on the Java path (the batch policy), or null. */
        String javaReason() {
            return javaReason;
        }

        /** Whether {@link #step} takes token ids (it looks them up in the embedding table). */
        boolean embedsTokens() {
            return script != null && scripted.ends().embed();
        }

        /** Whether {@link #step} returns the logits (it applies the final norm and the head). */
        boolean computesLogits() {
            return script != null && scripted.ends().head();
        }

        /**
         * The scripted step ({@link #isScripted()}): see {@link ScriptedStage.Bound#forward}.
         *
         * @param input token ids {@code (B, T)} if {@link #embedsTokens()}, else the hidden state
         * @return the logits {@code (B, V)} FP32 if {@link #computesLogits()}, else the hidden state
         */
        NDArray step(NDManager out, NDArray input, NDArray positions, NDArray attentionMask) {
            return script.forward(out, input, positions, attentionMask);
        }

        /**
         * Runs this stage's layers over {@code hidden (B, T, hidden)} on the Java path, writing their cache at positions
         * {@code [length, total)}.
         *
         * @param mask the additive mask {@code (B, 1, T, S)} FP32 on this device ({@link #additiveMask})
         */
        NDArray forward(ParameterStore ps, NDArray hidden, NDList cosSin, NDArray mask, int length, int t, int total) {
            NDArray input = hidden;
            for (int i = 0; i < layers.length; i++) {
                DeepSeekDecoderLayer layer = layers[i];
                NDArray next;
                // each layer's temporaries are closed when it is done, not when the step's scope ends: a prefill's
                // (B, H, T, S) scores and MoE buffers would otherwise pile up over the layers (bench-small, batch 8,
                // prompt 512, CPU: a 10.7 GB peak against the script's 1.9 GB)
                try (NDScope scope = new NDScope()) {
                    scope.suppressNotUsedWarning();
                    NDArray normed = layer.inputLayernorm().forward(ps, new NDList(hidden), false).head();
                    int index = i;
                    // (B, T, hidden); the attention's and the MLP's temporaries each closed when it returns
                    NDArray attn = scoped(() -> attend(index, ps, normed, cosSin, mask, length, t, total));
                    NDArray h = hidden.add(attn);
                    NDArray normed2 = layer.postAttentionLayernorm().forward(ps, new NDList(h), false).head();
                    NDArray mlp = scoped(() -> layer.mlp().forward(ps, new NDList(normed2), false).head());
                    next = h.add(mlp); // (B, T, hidden)
                    NDScope.unregister(next);
                }
                if (hidden != input) {
                    hidden.close();
                }
                hidden = next;
                if (afterLayer != null) {
                    afterLayer.accept(i);
                }
            }
            if (hidden != input) {
                NDScope.register(hidden); // the step's scope owns the result, as it owned every array before
            }
            return hidden;
        }

        /**
         * {@code f}'s result, its temporaries closed when it returns (the attention's scores are gone before the MLP
         * runs); the result belongs to the enclosing scope.
         */
        private NDArray scoped(java.util.function.Supplier<NDArray> f) {
            NDArray result;
            try (NDScope scope = new NDScope()) {
                scope.suppressNotUsedWarning();
                result = f.get();
                NDScope.unregister(result);
            }
            NDScope.register(result);
            return result;
        }

        private NDArray attend(int i, ParameterStore ps, NDArray x, NDList cosSin, NDArray mask, int length, int t,
                int total) {
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

        /**
         * (B, 1, T, S) FP32 on this device: 0 where query {@code i} (at cache index S - T + i) may see key j, else the
         * lowest float.
         *
         * @param attentionMask (B, total) on this device
         */
        NDArray additiveMask(NDManager m, NDArray attentionMask, int length, int t, int total) {
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

        /** Bytes held by this stage's cache buffers. */
        long cacheBytes() {
            long bytes = 0;
            for (int i = 0; i < latent.length; i++) {
                bytes += latent[i].size() * dtype.getNumOfBytes() + ropeKey[i].size() * dtype.getNumOfBytes();
            }
            return bytes;
        }

        @Override
        public void close() {
            if (script != null) {
                script.close();
            }
            manager.close();
        }
    }
}
