package ai.djl.memopt.nn;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;

/**
 * A block that computes {@code y = x W^T} and can hand out its effective weight {@code W} of shape
 * {@code (out, in)}: a plain {@link Linear}, or a decorator around one (quantized, LoRA) that materialises the weight
 * on demand. Code that needs the matrix itself (the absorbed MLA decode path, merging adapters) asks for it through
 * {@link #weightOf(Block, NDManager)} instead of reading a parameter, so it works on decorated models too.
 */
public interface LinearWeightSource {

    /**
     * The effective weight {@code (out, in)}, attached to {@code manager} (the caller closes it). A decorator that
     * dequantizes returns a fresh array; a plain layer may return a view of its parameter.
     */
    NDArray weight(NDManager manager);

    /**
     * How many weights this block stands for when its own arrays are not {@link Parameter}s (a quantized layer's
     * {@code out x in}, not its packed bytes), so that parameter counts include it; 0 when its weights are parameters
     * (or wrapped: an adapter counts through its base).
     */
    default long storedWeightCount() {
        return 0;
    }

    /**
     * The effective weight of a {@link LinearWeightSource} or of a plain DJL {@link Linear} (without bias).
     *
     * @throws IllegalArgumentException if the block is neither
     */
    static NDArray weightOf(Block block, NDManager manager) {
        if (block instanceof LinearWeightSource) {
            return ((LinearWeightSource) block).weight(manager);
        }
        if (block instanceof Linear) {
            Parameter w = block.getParameters().get("weight");
            return w.getArray();
        }
        throw new IllegalArgumentException(
                "block " + block.getClass().getName() + " is neither a Linear nor a LinearWeightSource");
    }
}
