package ai.djl.memopt.model.deepseek;

import ai.djl.ndarray.NDList;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.ndarray.NDManager;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import java.util.List;

/**
 * An indexed container like PyTorch's {@code nn.ModuleList}: children named {@code 0..n-1} so that dotted paths read
 * {@code model.layers.3...} or {@code mlp.experts.17...}. Its owner calls the children itself, always through
 * {@link #get(int)}, so a child swapped by {@code BlockTrees.replaceChild} is the one that runs.
 */
public final class ModuleList extends AbstractBlock {

    private static final byte VERSION = 1;

    private final Shape childInput;

    /**
     * @param blocks the children, in order
     * @param childInput the input shape each child is initialised with
     */
    public ModuleList(List<? extends Block> blocks, Shape childInput) {
        super(VERSION);
        this.childInput = childInput;
        for (int i = 0; i < blocks.size(); i++) {
            addChildBlock(Integer.toString(i), blocks.get(i));
        }
    }

    /** Number of children. */
    public int size() {
        return children.size();
    }

    /** The child at {@code index} (the current one, after any replacement). */
    public Block get(int index) {
        return children.valueAt(index);
    }

    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        for (Block b : children.values()) {
            b.initialize(manager, dataType, childInput);
        }
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        throw new UnsupportedOperationException("a ModuleList is not called; its owner runs the children");
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return inputShapes;
    }
}
