package ai.djl.memopt.examples.wrap;

import ai.djl.Device;
import ai.djl.Model;
import ai.djl.inference.Predictor;
import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingGradientCollector;
import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.inference.GenerationRequest;
import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.GenerationTranslator;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.memopt.inference.TextTokenizer;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.memopt.precision.MixedPrecisionOptimizer;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import ai.djl.training.optimizer.Optimizer;
import ai.djl.training.tracker.Tracker;
import ai.djl.translate.TranslateException;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;

/**
 * The DeepSeek model end to end, from a Hugging Face model directory ({@code config.json} + safetensors): a training
 * step with every decoder layer checkpointed, FP16 mixed-precision training, int8/int4 quantization, export of the
 * quantized artifact and loading it back, and generation with the compressed MLA cache through a plain DJL
 * {@link Predictor} ({@link GenerationTranslator}).
 *
 * <pre>
 * java -cp memopt.jar ai.djl.memopt.examples.wrap.DeepSeekExample MODEL_DIR [workDir]
 * </pre>
 */
public final class DeepSeekExample {

    private DeepSeekExample() {}

    /** Gradients of one step with and without checkpointing. */
    public record CheckpointResult(List<String> checkpointedLayers, float loss, float checkpointedLoss,
            double maxGradient, double maxGradientDiff, int parameters) {}

    /** Loss curves of FP32 and FP16 mixed-precision training. */
    public record PrecisionResult(float[] fp32Losses, float[] fp16Losses, double maxRelativeLossDiff,
            long skippedSteps, List<String> fp32Islands) {}

    /** Logits error and size of a quantized model. */
    public record QuantizeResult(String scheme, int quantizedLayers, Map<String, String> skipped, long bytesBefore,
            long bytesAfter, double relativeLogitsError, double fp32Loss, double quantizedLoss) {}

    /** An exported artifact and the model loaded from it. */
    public record ExportResult(Path dir, long artifactBytes, long sourceBytes, double maxLogitsDiff) {}

    /**
     * One training step's gradients of the model as loaded and of the same model with every decoder layer wrapped in
     * a {@code CheckpointBlock} (activations recomputed in backward by a {@link CheckpointingGradientCollector}).
     *
     * @param ids token ids, {@code rows} rows
     */
    public static CheckpointResult checkpointedStep(Path modelDir, long[] ids, int rows) throws IOException {
        try (NDManager manager = NDManager.newBaseManager(Device.cpu())) {
            DeepSeekForCausalLM plain = DeepSeekLoader.load(modelDir, manager, DataType.FLOAT32);
            float[] loss = new float[2];
            Map<String, float[]> expected = gradients(plain, manager, ids, rows, false, loss, 0);

            DeepSeekForCausalLM lm = DeepSeekLoader.load(modelDir, manager, DataType.FLOAT32);
            // every decoder layer: only each layer's input stays in memory, its internals are recomputed in backward
            List<String> layers = Checkpointing.wrapChildren(lm, "model.layers", CheckpointPolicy.all());
            Map<String, float[]> actual = gradients(lm, manager, ids, rows, true, loss, 1);
            return new CheckpointResult(layers, loss[0], loss[1], WrapUserModelExample.maxAbs(expected),
                    WrapUserModelExample.maxAbsDiff(expected, actual), expected.size());
        }
    }

    private static Map<String, float[]> gradients(Block lm, NDManager manager, long[] ids, int rows,
            boolean checkpointed, float[] losses, int slot) {
        try (NDManager step = manager.newSubManager()) {
            NDArray input = step.create(ids, new Shape(rows, ids.length / rows)); // (B, T)
            ParameterStore ps = new ParameterStore(step, false);
            try (GradientCollector gc = checkpointed ? CheckpointingGradientCollector.open(step)
                    : step.getEngine().newGradientCollector()) {
                NDArray logits = lm.forward(ps, new NDList(input), true).head(); // (B, T, V) FP32
                NDArray loss = CausalLmLoss.mean(logits, input);
                losses[slot] = loss.getFloat();
                gc.backward(loss);
            }
            Map<String, float[]> grads = new LinkedHashMap<>();
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(lm).entrySet()) {
                if (e.getValue().requiresGradient()) {
                    try (NDArray g = e.getValue().getArray().getGradient()) {
                        grads.put(e.getKey(), g.toFloatArray());
                    }
                }
            }
            return grads;
        }
    }

    /**
     * Trains {@code steps} Adam steps on the same batch in FP32 and with {@link MixedPrecisionBlock} (FP16 weights and
     * compute; norms, router, softmax and logits in FP32) and {@link MixedPrecisionOptimizer} (FP32 masters, dynamic
     * loss scaling).
     */
    public static PrecisionResult mixedPrecision(Path modelDir, long[] ids, int rows, int steps) throws IOException {
        float[][] losses = new float[2][steps];
        try (NDManager manager = NDManager.newBaseManager(Device.cpu())) {
            for (int run = 0; run < 2; run++) {
                DeepSeekForCausalLM lm = DeepSeekLoader.load(modelDir, manager, DataType.FLOAT32);
                Block net = run == 1 ? MixedPrecisionBlock.wrap(lm) : lm;
                MixedPrecisionOptimizer opt = MixedPrecisionOptimizer.builder().setBlock(net)
                        .setOptimizer(Optimizer.adam().optLearningRateTracker(Tracker.fixed(1e-3f)).build()).build();
                for (int s = 0; s < steps; s++) {
                    try (NDManager step = manager.newSubManager()) {
                        NDArray input = step.create(ids, new Shape(rows, ids.length / rows)); // (B, T)
                        ParameterStore ps = new ParameterStore(step, false);
                        try (GradientCollector gc = step.getEngine().newGradientCollector()) {
                            NDArray logits = net.forward(ps, new NDList(input), true).head(); // (B, T, V) FP32
                            NDArray loss = CausalLmLoss.mean(logits, input);
                            losses[run][s] = loss.getFloat();
                            gc.backward(opt.scaleLoss(loss));
                        }
                        opt.step();
                    }
                }
                if (run == 1) {
                    return new PrecisionResult(losses[0], losses[1],
                            WrapUserModelExample.maxRelativeDiff(losses[0], losses[1]),
                            opt.getLossScaler().getSkippedSteps(), ((MixedPrecisionBlock) net).fp32Paths());
                }
            }
        }
        throw new AssertionError("unreachable");
    }

    /** Quantizes the loaded model in place and compares its logits and loss with FP32. */
    public static QuantizeResult quantize(Path modelDir, QuantizationConfig config, long[] ids, int rows)
            throws IOException {
        try (NDManager manager = NDManager.newBaseManager(Device.cpu())) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(modelDir, manager, DataType.FLOAT32);
            NDArray input = manager.create(ids, new Shape(rows, ids.length / rows));
            float[] before = logits(lm, input);
            double lossBefore = loss(lm, input);
            QuantizationReport report = Quantizer.quantize(lm, config);
            float[] after = logits(lm, input);
            return new QuantizeResult(config.scheme().id(), report.layers().size(), report.skipped(),
                    report.bytesBefore(), report.bytesAfter(), WrapUserModelExample.relativeL2(before, after),
                    lossBefore, loss(lm, input));
        }
    }

    /**
     * Quantizes, exports the artifact to {@code out} (with the source's config, tokenizer and generation config),
     * opens it the way every tool does ({@link ModelDirectories#loadDeepSeek}) and compares the logits.
     */
    public static ExportResult exportAndLoad(Path modelDir, QuantizationConfig config, Path out, long[] ids, int rows)
            throws IOException {
        try (NDManager manager = NDManager.newBaseManager(Device.cpu())) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(modelDir, manager, DataType.FLOAT32);
            Quantizer.quantize(lm, config);
            QuantizedArtifact.export(lm, out, ExportOptions.builder().optSourceModel(modelDir).build());
            DeepSeekForCausalLM loaded = ModelDirectories.loadDeepSeek(out, manager, DataType.FLOAT32);
            NDArray input = manager.create(ids, new Shape(rows, ids.length / rows));
            double diff = WrapUserModelExample.maxAbsDiff(logits(lm, input), logits(loaded, input));
            return new ExportResult(out, WrapUserModelExample.directoryBytes(out),
                    WrapUserModelExample.directoryBytes(modelDir), diff);
        }
    }

    /**
     * Greedy generation from a model directory or quantized artifact through a DJL {@link Predictor}: the block is
     * the causal LM, {@link GenerationTranslator} decodes with the compressed MLA cache (one latent vector per token
     * and layer instead of full keys and values). Uses the directory's tokenizer for {@code text} when it has one.
     *
     * @return the new token ids
     */
    public static GenerationResult generate(Path modelDir, long[] promptIds, String text, int maxNewTokens)
            throws IOException, TranslateException {
        TextTokenizer tokenizer = Files.isRegularFile(modelDir.resolve("tokenizer.json"))
                ? TextTokenizer.fromModelDir(modelDir) : null;
        try (NDManager weights = NDManager.newBaseManager(Device.cpu());
                Model model = Model.newInstance("deepseek", Device.cpu())) {
            model.setBlock(ModelDirectories.loadDeepSeek(modelDir, weights, DataType.FLOAT32));
            SamplingParams params = SamplingParams.builder().setMaxNewTokens(maxNewTokens)
                    .optEosTokenIds(TextTokenizer.readEosIds(modelDir)).build();
            GenerationRequest.Builder request = GenerationRequest.builder().setParams(params);
            if (text != null && tokenizer != null) {
                request.optText(text);
            } else {
                request.optPromptIds(promptIds);
            }
            try (Predictor<GenerationRequest, GenerationResult> predictor =
                    model.newPredictor(new GenerationTranslator(tokenizer))) {
                return predictor.predict(request.build());
            }
        } finally {
            if (tokenizer != null) {
                tokenizer.close();
            }
        }
    }

    private static float[] logits(Block lm, NDArray input) {
        try (NDManager scope = input.getManager().newSubManager()) {
            ParameterStore ps = new ParameterStore(scope, false);
            return lm.forward(ps, new NDList(input), false).head().toFloatArray();
        }
    }

    private static double loss(Block lm, NDArray input) {
        try (NDManager scope = input.getManager().newSubManager()) {
            ParameterStore ps = new ParameterStore(scope, false);
            return CausalLmLoss.mean(lm.forward(ps, new NDList(input), false).head(), input).getFloat();
        }
    }

    /** A fixed batch of {@code rows * cols} token ids below {@code vocab}. */
    public static long[] tokens(int rows, int cols, int vocab) {
        long[] ids = new long[rows * cols];
        for (int i = 0; i < ids.length; i++) {
            ids[i] = (i * 37L + 11) % vocab;
        }
        return ids;
    }

    /** Runs every step on {@code args[0]} (a DeepSeek model directory) and prints the measurements. */
    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: DeepSeekExample MODEL_DIR [WORK_DIR]");
            System.exit(2);
        }
        Path dir = Path.of(args[0]);
        Path work = args.length > 1 ? Path.of(args[1]) : Files.createTempDirectory("memopt-deepseek");
        int vocab = ai.djl.memopt.model.deepseek.DeepSeekConfig.fromJson(dir.resolve("config.json")).vocabSize();
        long[] ids = tokens(2, 16, vocab);
        CheckpointResult c = checkpointedStep(dir, ids, 2);
        System.out.printf(Locale.ROOT, "checkpointing %s: loss %.6f vs %.6f, max |grad| %.3g, max grad diff %.3g over %d"
                + " parameters%n", c.checkpointedLayers(), c.loss(), c.checkpointedLoss(), c.maxGradient(),
                c.maxGradientDiff(), c.parameters());
        PrecisionResult p = mixedPrecision(dir, ids, 2, 4);
        System.out.printf(Locale.ROOT, "mixed precision: fp32 %s, fp16 %s, max relative diff %.2e, skipped %d%n",
                Arrays.toString(p.fp32Losses()), Arrays.toString(p.fp16Losses()), p.maxRelativeLossDiff(),
                p.skippedSteps());
        for (QuantizationConfig q : List.of(Int8WeightOnlyConfig.builder().build(),
                Int4WeightOnlyConfig.builder().optGroupSize(32).build())) {
            QuantizeResult r = quantize(dir, q, ids, 2);
            System.out.printf(Locale.ROOT, "%s: %d layers, %d -> %d bytes, relative logits error %.4f, loss %.4f ->"
                    + " %.4f, skipped %s%n", r.scheme(), r.quantizedLayers(), r.bytesBefore(), r.bytesAfter(),
                    r.relativeLogitsError(), r.fp32Loss(), r.quantizedLoss(), r.skipped().keySet());
        }
        ExportResult e = exportAndLoad(dir, Int8WeightOnlyConfig.builder().build(), work.resolve("int8"), ids, 2);
        System.out.printf(Locale.ROOT, "export: %s (%d bytes, source %d bytes), max logits diff after loading %.3g%n",
                e.dir(), e.artifactBytes(), e.sourceBytes(), e.maxLogitsDiff());
        long[] prompt = Arrays.copyOf(ids, 6);
        System.out.println("fp32 generation: " + Arrays.toString(generate(dir, prompt, null, 16).outputIds()));
        System.out.println("int8 generation: " + Arrays.toString(generate(e.dir(), prompt, null, 16).outputIds()));
    }
}
