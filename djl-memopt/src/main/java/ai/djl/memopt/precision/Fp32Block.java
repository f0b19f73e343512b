package ai.djl.memopt.precision;

import ai.djl.memopt.nn.PrecisionIsland;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;

/**
 * An FP32 island inside an FP16 {@link MixedPrecisionBlock}: casts floating FP16 inputs to FP32, runs the wrapped block
 * (norm, router, softmax) with FP32 parameters, and casts floating outputs back to FP16 for the FP16 code around it.
 * Shapes are the wrapped block's. Transparent to {@link ai.djl.memopt.nn.BlockTrees} paths.
 */
public final class Fp32Block extends AbstractBlock implements PrecisionIsland {

    private static final byte VERSION = 1;

    private final Block block;
    private final DataType outer;

    /**
     * @param block the block to run in FP32
     * @param outer the type of the code around it (FP16), which outputs are cast back to
     */
    public Fp32Block(Block block, DataType outer) {
        super(VERSION);
        Precisions.checkSupported(outer);
        this.block = addChildBlock("fp32", block);
        this.outer = outer;
        if (block.isInitialized()) {
            inputShapes = block.getInputShapes();
        }
    }

    /** {@inheritDoc} */
    @Override
    public DataType innerType() {
        return DataType.FLOAT32;
    }

    /** {@inheritDoc} */
    @Override
    public DataType outerType() {
        return outer;
    }

    /** {@inheritDoc} */
    @Override
    public Block delegate() {
        return block;
    }

    /** {@inheritDoc} */
    @Override
    protected NDList forwardInternal(
            ParameterStore parameterStore, NDList inputs, boolean training, PairList<String, Object> params) {
        return Casts.forward(block, parameterStore, inputs, training, params, DataType.FLOAT32, outer);
    }

    /** {@inheritDoc} */
    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return block.getOutputShapes(inputShapes);
    }

    /** {@inheritDoc} */
    @Override
    public boolean isInitialized() {
        return block.isInitialized();
    }

    /** {@inheritDoc} */
    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        block.initialize(manager, DataType.FLOAT32, inputShapes);
    }

    /** {@inheritDoc} */
    @Override
    public String toString() {
        return "Fp32(" + block + ")";
    }
}
