package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekDecoderLayer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekModel;
import ai.djl.memopt.model.deepseek.MultiHeadLatentAttention;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import com.google.common.base.Preconditions;
import java.util.Map;

/** How {@link MlaCachedDecoder} finds a model's blocks and checks that they sit on the devices its plan gives them. */
final class DecoderWiring {

    private DecoderWiring() {}

    /**
     * The decoder stages of {@code plan} over the model's layers, each checked to be a {@link DeepSeekDecoderLayer}
     * with its weights on the stage's device.
     */
    static DecoderStage[] stages(DeepSeekForCausalLM model, StagePlan plan, DataType dtype, ExpertDispatch experts) {
        DeepSeekModel decoder = model.model();
        DecoderStage[] stages = new DecoderStage[plan.stages().size()];
        for (int s = 0; s < stages.length; s++) {
            StagePlan.Stage stage = plan.stages().get(s);
            DeepSeekDecoderLayer[] layers = new DeepSeekDecoderLayer[stage.layers()];
            MultiHeadLatentAttention[] attention = new MultiHeadLatentAttention[stage.layers()];
            for (int i = stage.firstLayer(); i < stage.endLayer(); i++) {
                Block layer = decoder.layers().get(i);
                Preconditions.checkArgument(
                        layer instanceof DeepSeekDecoderLayer,
                        "model.layers.%s is a %s, expected a DeepSeekDecoderLayer", i, layer.getClass().getName());
                layers[i - stage.firstLayer()] = (DeepSeekDecoderLayer) layer;
                attention[i - stage.firstLayer()] = findAttention(((DeepSeekDecoderLayer) layer).selfAttn(), i);
                checkDevice(layer, "model.layers." + i + ".", stage.device(), "layer " + i + " on stage " + s);
            }
            stages[s] = new DecoderStage(model.config(), stage.device(), stage.firstLayer(), layers, attention,
                    decoder.rotaryEmb(), dtype, experts);
        }
        return stages;
    }

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
