package ai.djl.memopt.examples.guide;

import ai.djl.Model;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.lora.LoraReport;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.training.GradientCollector;
import ai.djl.training.Trainer;
import ai.djl.training.TrainingConfig;
import ai.djl.training.dataset.Batch;
import java.io.IOException;
import java.nio.file.Path;

/** The guide's LoRA snippet. */
public final class LoraSnippet {

    private LoraSnippet() {}

    // guide:begin
    /** Trains rank-4 adapters on an MLP's Linear layers, saves them as PEFT does, then merges them into the weights. */
    public static LoraReport trainAdapters(Model model, Block net, Shape inputShape, TrainingConfig config,
            Iterable<Batch> batches, Path adapterDir) throws IOException {
        net.initialize(model.getNDManager(), DataType.FLOAT32, inputShape); // or your trained weights
        LoraReport report = Lora.apply(net, LoraConfig.builder().setRank(4).optAlpha(8)
                .optTargetModules("1", "3", "5").build()); // PEFT-style names; freezes every other parameter
        model.setBlock(net);
        try (Trainer trainer = model.newTrainer(config)) { // closed before Lora.merge (see below)
            for (Batch batch : batches) {
                try (GradientCollector gc = trainer.newGradientCollector()) {
                    NDArray loss = trainer.getLoss().evaluate(batch.getLabels(),
                            trainer.forward(batch.getData(), batch.getLabels()));
                    gc.backward(loss);
                }
                trainer.step(); // only lora_A and lora_B change
            }
        }
        Lora.save(net, adapterDir); // adapter_model.safetensors + adapter_config.json, as PEFT writes them
        Lora.merge(net); // W += scale * B A: the targets are plain Linear blocks again
        return report;
    }
    // guide:end
}
