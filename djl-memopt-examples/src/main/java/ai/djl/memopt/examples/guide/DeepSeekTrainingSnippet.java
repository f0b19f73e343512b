package ai.djl.memopt.examples.guide;

import ai.djl.Device;
import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingGradientCollector;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.io.IOException;
import java.nio.file.Path;

/** The guide's DeepSeek loading and checkpointed training-step snippet. */
public final class DeepSeekTrainingSnippet {

    private DeepSeekTrainingSnippet() {}

    // guide:begin
    /** Loads a Hugging Face DeepSeek directory and runs one training step with every decoder layer checkpointed. */
    public static float checkpointedStep(Path dir, Device device, long[] tokenIds, int batch) throws IOException {
        // dir: a Hugging Face directory (config.json + safetensors), e.g. DeepSeek-V2-Lite; device: Device.gpu() ...
        try (NDManager manager = NDManager.newBaseManager(device)) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, manager, DataType.FLOAT32); // or FLOAT16; BF16 converted
            Checkpointing.wrapChildren(lm, "model.layers", CheckpointPolicy.all());
            NDArray ids = manager.create(tokenIds, new Shape(batch, tokenIds.length / batch)); // (B, T) INT64
            ParameterStore ps = new ParameterStore(manager, false);
            try (GradientCollector gc = CheckpointingGradientCollector.open(manager)) {
                NDArray logits = lm.forward(ps, new NDList(ids), true).head(); // (B, T, V) FP32
                NDArray loss = CausalLmLoss.mean(logits, ids);
                gc.backward(loss);
                return loss.getFloat();
            }
        }
    }
    // guide:end
}
