package ai.djl.memopt.model.deepseek;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;

/**
 * One pre-norm decoder layer: {@code h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))}
 * where {@code mlp} is a dense {@link DeepSeekMlp} for the first {@code first_k_dense_replace} layers and a
 * {@link DeepSeekMoE} after.
 *
 * <p>Shapes: inputs {@code hidden (B, T, H)}, {@code cos}, {@code sin} and optionally the additive mask (see
 * {@link MultiHeadLatentAttention}); output {@code (B, T, H)}.
 */
public final class DeepSeekDecoderLayer extends AbstractBlock {

    private static final byte VERSION = 1;

    private final DeepSeekConfig config;
    private final int index;
    private Block selfAttn;
    private Block mlp;
    private Block inputLayernorm;
    private Block postAttentionLayernorm;
    /** The scripted forward's module for this layer's current layout (see {@link ScriptedLayer}). */
    volatile ScriptedLayer.Compiled script;

    public DeepSeekDecoderLayer(DeepSeekConfig config, int index, RotaryEmbedding rotary) {
        super(VERSION);
        this.config = config;
        this.index = index;
        selfAttn = addChildBlock("self_attn", new MultiHeadLatentAttention(config, rotary));
        mlp = addChildBlock("mlp", config.isMoeLayer(index)
                ? new DeepSeekMoE(config)
                : new DeepSeekMlp(config.hiddenSize(), config.intermediateSize()));
        inputLayernorm = addChildBlock("input_layernorm", new RmsNorm(config.hiddenSize(), config.rmsNormEps()));
        postAttentionLayernorm =
                addChildBlock("post_attention_layernorm", new RmsNorm(config.hiddenSize(), config.rmsNormEps()));
    }

    /** The model config. */
    public DeepSeekConfig config() {
        return config;
    }

    /** Layer index in the model. */
    public int index() {
        return index;
    }

    /** The attention block ({@link MultiHeadLatentAttention} unless replaced by a decorator). */
    public Block selfAttn() {
        return selfAttn;
    }

    /** The feed-forward block ({@link DeepSeekMlp} or {@link DeepSeekMoE} unless replaced). */
    public Block mlp() {
        return mlp;
    }

    public Block inputLayernorm() {
        return inputLayernorm;
    }

    public Block postAttentionLayernorm() {
        return postAttentionLayernorm;
    }

    /** True when this layer's {@code mlp} is a mixture of experts. */
    public boolean isMoe() {
        return config.isMoeLayer(index);
    }

    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        Shape in = new Shape(1, 1, config.hiddenSize());
        selfAttn.initialize(manager, dataType, in);
        mlp.initialize(manager, dataType, in);
        inputLayernorm.initialize(manager, dataType, in);
        postAttentionLayernorm.initialize(manager, dataType, in);
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        // one TorchScript call instead of a JNI round trip per operation, where enabled and the layer is plain
        NDList scripted = ScriptedLayer.forward(this, ps, inputs, training);
        if (scripted != null) {
            return scripted;
        }
        return Scoped.run(() -> {
            NDArray x = inputs.get(0);
            NDArray normed = inputLayernorm.forward(ps, new NDList(x), training).head();
            NDList attnIn = new NDList(normed);
            for (int i = 1; i < inputs.size(); i++) {
                attnIn.add(inputs.get(i));
            }
            NDArray h = x.add(selfAttn.forward(ps, attnIn, training).head()); // (B, T, H)
            NDArray normed2 = postAttentionLayernorm.forward(ps, new NDList(h), training).head();
            return new NDList(h.add(mlp.forward(ps, new NDList(normed2), training).head())); // (B, T, H)
        });
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0]};
    }
}
