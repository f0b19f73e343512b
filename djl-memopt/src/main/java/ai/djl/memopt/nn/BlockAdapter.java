package ai.djl.memopt.nn;

import ai.djl.nn.Block;

/**
 * A block that adds its own parameters to a wrapped base block that keeps computing (a LoRA adapter around a
 * projection). Unlike a {@link BlockDecorator} it is not transparent to parameter paths (its parameters and its base's
 * sit under its own path, as PEFT names them), but the passes that act on layers see through it: quantizing or pruning
 * the path of an adapter acts on its base, and {@link BlockTrees#replace} there replaces the base inside the adapter.
 */
public interface BlockAdapter extends Block {

    /** The wrapped block that keeps computing (possibly itself decorated). */
    Block base();
}
