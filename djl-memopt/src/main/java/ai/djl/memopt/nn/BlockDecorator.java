package ai.djl.memopt.nn;

import ai.djl.nn.Block;

/**
 * A block that wraps another block to change how it runs (activation checkpointing, mixed precision) without changing
 * what it computes or which parameters it owns.
 *
 * <p>{@link BlockTrees} treats a decorator as transparent: its path is the wrapped block's path, its children are the
 * wrapped block's children and its parameters the wrapped block's parameters, so {@code BlockTrees.parameters(model)} reads
 * the same Hugging Face names before and after decoration ({@code model.layers.0.mlp.gate_proj.weight}, not
 * {@code model.layers.0.block.mlp...}), and {@link BlockTrees#replace} of a path below a decorator changes the wrapped
 * block that actually runs. Decorators that own parameters of their own (LoRA adapters) are {@link BlockAdapter}s
 * instead; replacements (quantized layers) are neither.
 *
 * <p>{@link BlockTrees#replace} and the passes built on {@link BlockTrees#sites} keep a decorator where it is and change what
 * it wraps, then call {@link #blocksReplaced()} on every decorator above the change, so decorators compose in any
 * order: checkpointing then quantizing gives the same tree as quantizing then checkpointing.
 */
public interface BlockDecorator extends Block {

    /** The wrapped block (possibly itself a decorator). */
    Block delegate();

    /**
     * Called after a block below this decorator was replaced through {@link BlockTrees} (quantized, adapted, merged), so
     * that state kept about the blocks below (mixed precision's master weights) follows. Does nothing by default.
     */
    default void blocksReplaced() {}

    /** Follows {@link #delegate()} until a block that is not a decorator. */
    static Block unwrap(Block block) {
        Block current = block;
        while (current instanceof BlockDecorator) {
            current = ((BlockDecorator) current).delegate();
        }
        return current;
    }
}
