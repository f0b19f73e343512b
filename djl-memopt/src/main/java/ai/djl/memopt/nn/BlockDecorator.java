package ai.djl.memopt.nn;

import ai.djl.nn.Block;

/**
 * A block that wraps another block to change how it runs (activation checkpointing, mixed precision) without changing
 * what it computes or which parameters it owns.
 *
 * <p>{@link Blocks} treats a decorator as transparent: its path is the wrapped block's path, its children are the
 * wrapped block's children and its parameters the wrapped block's parameters, so {@code Blocks.parameters(model)} reads
 * the same Hugging Face names before and after decoration ({@code model.layers.0.mlp.gate_proj.weight}, not
 * {@code model.layers.0.block.mlp...}), and {@link Blocks#replace} of a path below a decorator changes the wrapped
 * block that actually runs. Decorators that own parameters of their own (LoRA adapters, quantized weights) should not
 * implement this interface.
 */
public interface BlockDecorator extends Block {

    /** The wrapped block (possibly itself a decorator). */
    Block delegate();

    /** Follows {@link #delegate()} until a block that is not a decorator. */
    static Block unwrap(Block block) {
        Block current = block;
        while (current instanceof BlockDecorator) {
            current = ((BlockDecorator) current).delegate();
        }
        return current;
    }
}
