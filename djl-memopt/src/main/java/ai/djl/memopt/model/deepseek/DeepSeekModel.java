package ai.djl.memopt.model.deepseek;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import java.util.ArrayList;
import java.util.List;

/**
 * The DeepSeek decoder stack (Hugging Face {@code DeepseekV3Model}/{@code DeepseekV2Model}): children
 * {@code embed_tokens}, {@code layers} ({@code 0..L-1}), {@code norm}, and the parameter-free {@code rotary_emb}.
 *
 * <p>Shapes: inputs {@code input_ids (B, T)} INT64, optional {@code attention_mask (B, T)} (1 keep, 0 padding; any
 * integer, boolean or float type) and optional {@code position_ids (B, T)} (default {@code 0..T-1}); output the final
 * normalised hidden states {@code (B, T, H)}. {@link #forwardHiddenStates} returns every hidden state.
 */
public final class DeepSeekModel extends AbstractBlock {

    private static final byte VERSION = 1;

    private final DeepSeekConfig config;
    private Block embedTokens;
    private final TokenEmbedding tokenEmbedding;
    private final ModuleList layers;
    private Block norm;
    private final RotaryEmbedding rotaryEmb;

    public DeepSeekModel(DeepSeekConfig config) {
        super(VERSION);
        this.config = config;
        RotaryEmbedding rotary = new RotaryEmbedding(config);
        List<DeepSeekDecoderLayer> list = new ArrayList<>();
        for (int i = 0; i < config.numHiddenLayers(); i++) {
            list.add(new DeepSeekDecoderLayer(config, i, rotary));
        }
        tokenEmbedding = new TokenEmbedding(config.vocabSize(), config.hiddenSize());
        embedTokens = addChildBlock("embed_tokens", tokenEmbedding);
        layers = addChildBlock("layers", new ModuleList(list, new Shape(1, 1, config.hiddenSize())));
        norm = addChildBlock("norm", new RmsNorm(config.hiddenSize(), config.rmsNormEps()));
        rotaryEmb = addChildBlock("rotary_emb", rotary);
    }

    public DeepSeekConfig config() {
        return config;
    }

    /** The token embedding ({@link TokenEmbedding} unless replaced). */
    public Block embedTokens() {
        return embedTokens;
    }

    /** The embedding table created with the model (its {@code weight} is the tied output matrix), even if decorated. */
    public TokenEmbedding tokenEmbedding() {
        return tokenEmbedding;
    }

    /** The decoder layers; {@code layers().get(i)} is layer {@code i} (a {@link DeepSeekDecoderLayer} or decorator). */
    public ModuleList layers() {
        return layers;
    }

    /** The final norm ({@link RmsNorm} unless replaced). */
    public Block norm() {
        return norm;
    }

    public RotaryEmbedding rotaryEmb() {
        return rotaryEmb;
    }

    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        Shape in = new Shape(1, 1, config.hiddenSize());
        embedTokens.initialize(manager, dataType, new Shape(1, 1));
        layers.initialize(manager, dataType, in);
        norm.initialize(manager, dataType, in);
        rotaryEmb.initialize(manager, dataType, new Shape(1, 1, 1, config.qkRopeHeadDim()), new Shape(1, 1));
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        return run(ps, inputs, training, false);
    }

    /**
     * Forward returning every hidden state, as transformers' {@code output_hidden_states}: index 0 the token embeddings,
     * {@code i} the output of layer {@code i-1} for {@code i < L}, and {@code L} the output of the last layer after the
     * final norm.
     *
     * @return {@code L + 1} arrays of shape {@code (B, T, H)}
     */
    public NDList forwardHiddenStates(ParameterStore ps, NDList inputs, boolean training) {
        return run(ps, inputs, training, true);
    }

    /**
     * Forward from token embeddings computed by the caller instead of token ids (transformers' {@code inputs_embeds}):
     * e.g. a trainer that gathers the embedding rows itself to control where their gradient goes.
     *
     * @param embeddings {@code (B, T, H)} in the type of the model's weights
     * @param attentionMask {@code (B, T)} (1 keep, 0 padding) or null
     * @return the final normalised hidden states {@code (B, T, H)}
     */
    public NDArray forwardEmbeddings(ParameterStore ps, NDArray embeddings, NDArray attentionMask, boolean training) {
        return run(ps, embeddings, attentionMask, null, training, false).head();
    }

    private NDList run(ParameterStore ps, NDList inputs, boolean training, boolean all) {
        return run(ps, inputs.get(0), inputs.size() > 1 ? inputs.get(1) : null, inputs.size() > 2 ? inputs.get(2) : null,
                training, all);
    }

    /** {@code first} is the token ids {@code (B, T)}, or already embedded tokens {@code (B, T, H)}. */
    private NDList run(ParameterStore ps, NDArray first, NDArray attentionMask, NDArray positionIds, boolean training,
            boolean all) {
        boolean embedded = first.getShape().dimension() == 3;
        return Scoped.run(() -> {
            NDManager m = first.getManager();
            long t = first.getShape().get(1);
            NDArray pos = positionIds != null
                    ? positionIds
                    : m.arange(0, t, 1, DataType.INT64).toDevice(first.getDevice(), false).reshape(1, t); // (1, T)
            NDList cosSin = rotaryEmb.cosSin(pos);
            NDArray mask = buildMask(m, attentionMask, t);
            NDArray hidden = embedded ? first : embedTokens.forward(ps, new NDList(first), training).head(); // (B, T, H)
            NDList out = new NDList();
            if (all) {
                out.add(hidden);
            }
            for (int i = 0; i < layers.size(); i++) {
                NDList layerIn = new NDList(hidden, cosSin.get(0), cosSin.get(1), mask);
                hidden = layers.get(i).forward(ps, layerIn, training).head();
                if (all && i < layers.size() - 1) {
                    out.add(hidden);
                }
            }
            out.add(norm.forward(ps, new NDList(hidden), training).head());
            return out;
        });
    }

    /** Additive FP32 mask {@code (B|1, 1, T, T)}: causal, and padding keys dropped when a mask is given. */
    static NDArray buildMask(NDManager m, NDArray attentionMask, long t) {
        return Scoped.run(() -> {
            NDArray causal = MultiHeadLatentAttention.causalMask(m, t, t); // (1, 1, T, T)
            if (attentionMask == null) {
                return new NDList(causal);
            }
            long b = attentionMask.getShape().get(0);
            NDArray keep = attentionMask.toType(DataType.FLOAT32, false).neq(0)
                    .reshape(b, 1, 1, t).toDevice(causal.getDevice(), false); // (B, 1, 1, T)
            NDArray zeros = m.zeros(new Shape(b, 1, 1, t), DataType.FLOAT32).toDevice(causal.getDevice(), false);
            NDArray neg = m.full(new Shape(b, 1, 1, t), -Float.MAX_VALUE, DataType.FLOAT32)
                    .toDevice(causal.getDevice(), false);
            NDArray padding = NDArrays.where(keep, zeros, neg); // (B, 1, 1, T)
            // min of the two keeps the most negative float where either masks (adding would overflow to -inf)
            return new NDList(NDArrays.minimum(causal, padding)); // (B, 1, T, T)
        }).head();
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0].add(config.hiddenSize())};
    }
}
