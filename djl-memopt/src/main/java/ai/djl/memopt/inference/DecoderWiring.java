package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.MultiHeadLatentAttention;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import java.util.Map;

/** How {@link MlaCachedDecoder} finds a model's blocks and checks that they sit on the devices its plan gives them. */
final class DecoderWiring {

    private DecoderWiring() {}

    /** The device of a block's first initialised parameter, or {@code otherwise}. */
    static Device deviceOf(Block block, Device otherwise) {
        for (Parameter p : BlockTrees.parameters(block).values()) {
            if (p.isInitialized()) {
                return p.getArray().getDevice();
            }
        }
        return otherwise;
    }

    static void checkDevice(Block block, String prefix, Device expected, String where) {
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(block).entrySet()) {
            Parameter p = e.getValue();
            if (p.isInitialized() && !p.getArray().getDevice().equals(expected)) {
                throw new IllegalArgumentException(prefix + e.getKey() + " is on " + p.getArray().getDevice()
                        + ", but the stage plan puts " + where + " on " + expected + ": load the model with the plan's"
                        + " placement (StagePlan.newPlacement(), GenerationModel.open(dir, plan, dtype))");
            }
        }
    }

    /** The attention block itself, or the one inside a decorator that took its place. */
    static MultiHeadLatentAttention findAttention(Block selfAttn, int layer) {
        if (selfAttn instanceof MultiHeadLatentAttention) {
            return (MultiHeadLatentAttention) selfAttn;
        }
        for (Block b : BlockTrees.walk(selfAttn).values()) {
            if (b instanceof MultiHeadLatentAttention) {
                return (MultiHeadLatentAttention) b;
            }
        }
        throw new IllegalArgumentException(
                "model.layers." + layer + ".self_attn (" + selfAttn.getClass().getName() + ") holds no MultiHeadLatentAttention");
    }
}
