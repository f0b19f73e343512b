package ai.djl.memopt.nn;

import ai.djl.ndarray.types.DataType;

/**
 * A decorator that runs its block in another floating type: floating inputs are cast to {@link #innerType()}, the block
 * runs with parameters of that type, floating outputs are cast to {@link #outerType()}; integer arrays pass through.
 * The FP32 islands of mixed precision ({@code Fp32Block}) are such decorators. Code that computes a block's arithmetic
 * itself (the scripted decoder layer) reads the two types here instead of depending on the precision package.
 */
public interface PrecisionIsland extends BlockDecorator {

    /** The type the wrapped block computes in. */
    DataType innerType();

    /** The type floating outputs are cast to for the code around the island. */
    DataType outerType();
}
