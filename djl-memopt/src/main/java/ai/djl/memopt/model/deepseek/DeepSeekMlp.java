package ai.djl.memopt.model.deepseek;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Activation;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;

/**
 * SwiGLU feed-forward network: {@code down_proj(silu(gate_proj(x)) * up_proj(x))}. Used as the dense MLP of the first
 * {@code first_k_dense_replace} layers, as each routed expert and as the shared experts.
 *
 * <p>Shapes: {@code (..., hidden) -> (..., hidden)}; {@code gate_proj}, {@code up_proj} weights {@code (inter, hidden)},
 * {@code down_proj} {@code (hidden, inter)}.
 *
 * <pre>{@code
 * DeepSeekMlp mlp = new DeepSeekMlp(1024, 2816);
 * NDArray y = mlp.forward(ps, new NDList(x), training).head();
 * }</pre>
 */
public final class DeepSeekMlp extends AbstractBlock {

    private static final byte VERSION = 1;

    private final int hiddenSize;
    private final int intermediateSize;
    private Block gateProj;
    private Block upProj;
    private Block downProj;

    public DeepSeekMlp(int hiddenSize, int intermediateSize) {
        super(VERSION);
        this.hiddenSize = hiddenSize;
        this.intermediateSize = intermediateSize;
        gateProj = addChildBlock("gate_proj", Projections.linear(intermediateSize));
        upProj = addChildBlock("up_proj", Projections.linear(intermediateSize));
        downProj = addChildBlock("down_proj", Projections.linear(hiddenSize));
    }

    public int hiddenSize() {
        return hiddenSize;
    }

    public int intermediateSize() {
        return intermediateSize;
    }

    public Block gateProj() {
        return gateProj;
    }

    public Block upProj() {
        return upProj;
    }

    public Block downProj() {
        return downProj;
    }

    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        Projections.init(gateProj, manager, dataType, hiddenSize);
        Projections.init(upProj, manager, dataType, hiddenSize);
        Projections.init(downProj, manager, dataType, intermediateSize);
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        NDArray x = inputs.head();
        return Scoped.run(() -> {
            NDArray g = Projections.call(gateProj, ps, x, training); // (..., inter)
            NDArray u = Projections.call(upProj, ps, x, training); // (..., inter)
            NDArray act = g.mul(Activation.sigmoid(g)).mul(u); // silu(g) * u
            return new NDList(Projections.call(downProj, ps, act, training)); // (..., hidden)
        });
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0]};
    }
}
