package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import java.util.Map;

/** Makes the decoder for a model block. */
public final class LanguageModels {

    private LanguageModels() {}

    /**
     * The best decoder for a block: the block itself if it is a {@link LanguageModel}; the compressed-MLA-cache
     * {@link MlaCachedDecoder} for a {@link DeepSeekForCausalLM} (on the device of its weights).
     *
     * @throws IllegalArgumentException for a block this library cannot decode with
     */
    public static LanguageModel of(Block block) {
        if (block instanceof LanguageModel) {
            return (LanguageModel) block;
        }
        if (block instanceof DeepSeekForCausalLM) {
            return new MlaCachedDecoder((DeepSeekForCausalLM) block, deviceOf(block));
        }
        throw new IllegalArgumentException(
                "no decoder for block " + block.getClass().getName()
                        + ": pass a LanguageModel factory (e.g. RecomputingLanguageModel) to GenerationTranslator");
    }

    /** Full recomputation over a {@link DeepSeekForCausalLM} (no cache): the reference for the cached decoder. */
    public static LanguageModel recomputing(DeepSeekForCausalLM model) {
        return new RecomputingLanguageModel(model, model.config().vocabSize(), deviceOf(model), true);
    }

    /** The device of a block's first initialised parameter. */
    static Device deviceOf(Block block) {
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(block).entrySet()) {
            if (e.getValue().isInitialized()) {
                return e.getValue().getArray().getDevice();
            }
        }
        throw new IllegalArgumentException("block " + block.getClass().getName() + " has no initialised parameters");
    }
}
