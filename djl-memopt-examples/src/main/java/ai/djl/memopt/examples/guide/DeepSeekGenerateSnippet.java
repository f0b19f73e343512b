package ai.djl.memopt.examples.guide;

import ai.djl.Device;
import ai.djl.Model;
import ai.djl.inference.Predictor;
import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.inference.GenerationRequest;
import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.GenerationTranslator;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.memopt.inference.TextTokenizer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.nio.file.Path;

/** The guide's quantize, export and generate-through-a-Predictor snippet. */
public final class DeepSeekGenerateSnippet {

    private DeepSeekGenerateSnippet() {}

    // guide:begin
    /** Quantizes a DeepSeek directory into an artifact at {@code out}, then generates from it with a DJL Predictor. */
    public static GenerationResult quantizeAndGenerate(Path dir, Path out, String prompt) throws Exception {
        try (NDManager manager = NDManager.newBaseManager(Device.cpu())) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, manager, DataType.FLOAT32);
            Quantizer.quantize(lm, Int8WeightOnlyConfig.builder().build());
            // with the source directory, the artifact carries its config, tokenizer and generation config
            QuantizedArtifact.export(lm, out, ExportOptions.builder().optSourceModel(dir).build());
        }
        try (NDManager weights = NDManager.newBaseManager(Device.cpu());
                Model model = Model.newInstance("deepseek", Device.cpu());
                TextTokenizer tokenizer = TextTokenizer.fromModelDir(out)) { // or pass null: prompts as token ids
            model.setBlock(ModelDirectories.loadDeepSeek(out, weights, DataType.FLOAT32)); // artifact or HF directory
            SamplingParams params = SamplingParams.builder().setMaxNewTokens(16)
                    .optEosTokenIds(TextTokenizer.readEosIds(out)).build(); // greedy unless optTemperature
            try (Predictor<GenerationRequest, GenerationResult> predictor =
                    model.newPredictor(new GenerationTranslator(tokenizer))) {
                GenerationResult r = predictor.predict(
                        GenerationRequest.builder().optText(prompt).setParams(params).build());
                System.out.println(r.text() + " " + r.finishReason());
                return r;
            }
        }
    }
    // guide:end
}
