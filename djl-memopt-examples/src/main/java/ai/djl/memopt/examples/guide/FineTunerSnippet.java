package ai.djl.memopt.examples.guide;

import ai.djl.Device;
import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.StatefulOptimizer;
import ai.djl.memopt.finetune.StepResult;
import ai.djl.memopt.finetune.TextCorpus;
import ai.djl.memopt.finetune.TokenDataset;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Path;

/** The guide's fine-tuning snippet (what {@code memopt finetune} does). */
public final class FineTunerSnippet {

    private FineTunerSnippet() {}

    // guide:begin
    /** Fine-tunes a DeepSeek directory on the text files of {@code corpus}, FP16 with checkpointing, and saves it. */
    public static long fineTune(Path modelDir, Path corpus, Path out, Device device, int seq, int steps)
            throws IOException {
        long skipped = 0;
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(modelDir, device, DataType.FLOAT32)) { // owns its weights
            TokenDataset data = TokenDataset.tokenize(TextCorpus.read(corpus), modelDir.resolve("tokenizer.json"),
                    seq, 0.05, 42); // tokens per sequence, held-out fraction, seed
            try (FineTuner tuner = FineTuner.builder().setModel(lm)
                    .optCheckpointing(CheckpointPolicy.all()).optPrecision(FineTuner.Precision.FP16)
                    .optOptimizer(StatefulOptimizer.Kind.ADAMW).optLearningRate(1e-4f)
                    .optGradientAccumulation(8).build()) {
                for (int i = 0; i < steps; i++) {
                    StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 16)); // 8 micro-batches of 2
                    skipped += r.skipped() ? 1 : 0; // FP16 overflow: the loss scale was halved, no update
                }
                tuner.saveCheckpoint(out.resolve("checkpoints/step-" + steps)); // restoreCheckpoint(dir) resumes
                tuner.saveModel(out); // config.json + model.safetensors; copy tokenizer.json yourself
            }
        }
        return skipped;
    }
    // guide:end
}
