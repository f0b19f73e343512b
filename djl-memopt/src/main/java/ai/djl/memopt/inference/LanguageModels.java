package ai.djl.memopt.inference;

import ai.djl.nn.Block;

/** Makes the decoder for a model block. */
public final class LanguageModels {

    private LanguageModels() {}

    /**
     * The best decoder for a block: the block itself if it is a {@link LanguageModel}, else an error naming what is
     * supported.
     *
     * @throws IllegalArgumentException for a block this library cannot decode with
     */
    public static LanguageModel of(Block block) {
        if (block instanceof LanguageModel) {
            return (LanguageModel) block;
        }
        throw new IllegalArgumentException(
                "no decoder for block " + block.getClass().getName()
                        + ": pass a LanguageModel factory (e.g. RecomputingLanguageModel) to GenerationTranslator");
    }
}
