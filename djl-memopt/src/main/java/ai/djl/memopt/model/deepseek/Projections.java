package ai.djl.memopt.model.deepseek;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.core.Linear;
import ai.djl.training.ParameterStore;

/** Helpers for the bias-free projections every DeepSeek block holds as plain {@link Block} fields. */
final class Projections {

    private Projections() {}

    /** A bias-free DJL {@link Linear} with {@code out} units (weight {@code (out, in)} once initialised). */
    static Linear linear(long out) {
        return Linear.builder().setUnits(out).optBias(false).build();
    }

    /** Initialises a projection for inputs of {@code in} features. */
    static void init(Block block, NDManager manager, DataType type, long in) {
        block.initialize(manager, type, new Shape(1, in));
    }

    /** Calls a projection (or whatever decorator replaced it) on one array. */
    static NDArray call(Block block, ParameterStore ps, NDArray x, boolean training) {
        return block.forward(ps, new NDList(x), training).head();
    }
}
