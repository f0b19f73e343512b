package ai.djl.memopt.examples.wrap;

import ai.djl.Model;
import ai.djl.engine.Engine;
import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingTrainer;
import ai.djl.memopt.export.ArtifactManifest;
import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.lora.LoraReport;
import ai.djl.memopt.nn.Blocks;
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
import ai.djl.nn.SequentialBlock;
import ai.djl.training.DefaultTrainingConfig;
import ai.djl.training.EasyTrain;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import ai.djl.training.Trainer;
import ai.djl.training.TrainingConfig;
import ai.djl.training.dataset.Batch;
import ai.djl.training.loss.Loss;
import ai.djl.training.optimizer.Optimizer;
import ai.djl.training.tracker.Tracker;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Random;
import java.util.function.Supplier;
import java.util.stream.Stream;

/**
 * Adds djl-memopt's memory features to a DJL model that already exists, without rebuilding it: activation
 * checkpointing, FP16 mixed precision, int8/int4 weight-only quantization, and export/load of the quantized artifact.
 * Runs on the two {@link UserModels} (basicmodelzoo's {@code Mlp} on 3x32x32 images and a small {@code ResNetV1} on
 * 1x28x28 images) with synthetic data, and prints what each feature measured.
 *
 * <pre>
 * java -cp memopt.jar ai.djl.memopt.examples.wrap.WrapUserModelExample [workDir]
 * </pre>
 */
public final class WrapUserModelExample {

    /** The MLP of the examples: 3x32x32 -> 256 -> 128 -> 10 (3072 = 24 int4 groups of 128). */
    public static final Supplier<SequentialBlock> MLP = () -> UserModels.mlp(3 * 32 * 32, 10, 256, 128);
    /** Its input shape for one batch. */
    public static final Shape MLP_INPUT = new Shape(16, 3, 32, 32);
    /** The ResNet of the examples on 1x28x28 inputs. */
    public static final Supplier<SequentialBlock> RESNET = () -> UserModels.smallResNet(10);
    /** Its input shape for one batch. */
    public static final Shape RESNET_INPUT = new Shape(8, 1, 28, 28);

    private static final float LEARNING_RATE = 0.05f;

    private WrapUserModelExample() {}

    /** What checkpointing changed: nothing in the numbers, which is the point. */
    public record CheckpointResult(List<String> checkpointedChildren, double maxGradient, double maxGradientDiff,
            double maxWeightDiffAfterTraining, double maxRunningStatDiffAfterTraining, int steps) {}

    /** Loss curves of the same training in FP32 and in FP16 mixed precision. */
    public record PrecisionResult(float[] fp32Losses, float[] fp16Losses, double maxRelativeLossDiff,
            long skippedSteps, float finalLossScale, List<String> fp32Islands) {}

    /** Output error and size of a quantized model. */
    public record QuantizeResult(String scheme, int quantizedLayers, Map<String, String> skipped, long bytesBefore,
            long bytesAfter, double relativeOutputError, double minSqnrDb) {}

    /** An exported artifact loaded onto a freshly built model. */
    public record ExportResult(Path dir, long artifactBytes, int quantizedLayers, double maxOutputDiff,
            double freshVsQuantizedBeforeLoad) {}

    /** LoRA fine-tuning of a built model: what was trained, what stayed, and the merge. */
    public record LoraResult(List<String> adapted, long trainableParameters, long totalParameters, float firstLoss,
            float lastLoss, double maxFrozenWeightChange, double maxMergedOutputDiff, boolean mergedToLinear) {}

    /**
     * Adds rank-{@code rank} LoRA adapters to the Linear layers named {@code targets} of an initialized model
     * ({@code Lora.apply} freezes everything else), trains them {@code steps} SGD steps with a DJL {@code Trainer} on
     * one batch, checks that the frozen weights did not move, then merges the adapters into the weights
     * ({@code Lora.merge}) and compares the merged model's outputs with the adapted model's.
     */
    public static LoraResult lora(Supplier<? extends Block> factory, Shape inputShape, int rank, List<String> targets,
            int steps, long seed) {
        try (Model model = Model.newInstance("user-model")) {
            Block net = factory.get();
            Engine.getInstance().setRandomSeed((int) seed);
            net.initialize(model.getNDManager(), DataType.FLOAT32, inputShape);
            Map<String, float[]> before = weights(net, true);
            LoraReport report = Lora.apply(net, LoraConfig.builder().setRank(rank).optAlpha(2f * rank)
                    .optTargetModules(targets).build());
            model.setBlock(net);
            TrainingConfig config = new DefaultTrainingConfig(Loss.softmaxCrossEntropyLoss())
                    .optOptimizer(Optimizer.sgd().setLearningRateTracker(Tracker.fixed(0.2f)).build());
            float first = Float.NaN;
            float last = Float.NaN;
            try (Batch batch = syntheticBatch(model.getNDManager(), inputShape, seed)) {
                // the trainer must be closed before Lora.merge: Trainer.close syncs every parameter it has seen, and
                // merging closes the adapters' arrays (closing it afterwards throws UninitializedParameterException)
                try (Trainer trainer = model.newTrainer(config)) {
                    for (int step = 0; step < steps; step++) {
                        float loss;
                        try (GradientCollector gc = trainer.newGradientCollector()) {
                            NDArray value = trainer.getLoss().evaluate(batch.getLabels(),
                                    trainer.forward(batch.getData(), batch.getLabels()));
                            loss = value.getFloat();
                            gc.backward(value);
                        }
                        trainer.step();
                        first = step == 0 ? loss : first;
                        last = loss;
                    }
                }
                double frozenChange = 0;
                Map<String, float[]> after = weights(net, false); // frozen now: base weights no longer trainable
                for (Map.Entry<String, float[]> e : before.entrySet()) {
                    // an adapted layer's own weight is now under PEFT's name: <path>.base_layer.weight
                    String k = e.getKey();
                    int dot = k.lastIndexOf('.');
                    float[] now = after.containsKey(k) ? after.get(k)
                            : after.get(k.substring(0, dot) + ".base_layer" + k.substring(dot));
                    if (now == null) {
                        throw new IllegalStateException("base parameter " + e.getKey() + " disappeared");
                    }
                    frozenChange = Math.max(frozenChange, maxAbsDiff(e.getValue(), now));
                }
                float[] adapted = predict(net, model.getNDManager(), batch.getData());
                Lora.merge(net);
                float[] merged = predict(net, model.getNDManager(), batch.getData());
                boolean linear = targets.stream().allMatch(t -> Blocks.get(net, t) instanceof ai.djl.nn.core.Linear);
                return new LoraResult(report.wrappedPaths(), report.trainableParameters(), report.totalParameters(),
                        first, last, frozenChange, maxAbsDiff(adapted, merged), linear);
            }
        }
    }

    /**
     * Trains the model twice the normal DJL way ({@code Model}, {@code Trainer}, {@code EasyTrain}, SGD), once as
     * built and once with its top-level children checkpointed by {@code Checkpointing.wrapChildren} and a
     * {@link CheckpointingTrainer}, from the same initial weights on the same batches; compares the first step's
     * gradients and the weights after {@code steps} steps.
     */
    public static CheckpointResult checkpointing(Supplier<SequentialBlock> factory, Shape inputShape,
            CheckpointPolicy policy, int steps, long seed) {
        Run plain = train(factory, inputShape, null, steps, seed);
        Run checkpointed = train(factory, inputShape, policy, steps, seed);
        return new CheckpointResult(checkpointed.wrapped, maxAbs(plain.firstGradients),
                maxAbsDiff(plain.firstGradients, checkpointed.firstGradients),
                maxAbsDiff(plain.finalWeights, checkpointed.finalWeights),
                maxAbsDiff(plain.finalStats, checkpointed.finalStats), steps);
    }

    private record Run(List<String> wrapped, Map<String, float[]> firstGradients, Map<String, float[]> finalWeights,
            Map<String, float[]> finalStats) {}

    private static Run train(Supplier<SequentialBlock> factory, Shape inputShape, CheckpointPolicy policy, int steps,
            long seed) {
        try (Model model = Model.newInstance("user-model")) {
            SequentialBlock net = factory.get();
            model.setBlock(net);
            // the model exists; checkpointing is added to it in place, before the trainer reads its parameters
            List<String> wrapped = policy == null ? List.of() : Checkpointing.wrapChildren(net, policy);
            TrainingConfig config = new DefaultTrainingConfig(Loss.softmaxCrossEntropyLoss())
                    .optOptimizer(Optimizer.sgd().setLearningRateTracker(Tracker.fixed(LEARNING_RATE)).build());
            try (Trainer trainer = policy == null ? model.newTrainer(config) : new CheckpointingTrainer(model, config)) {
                Engine.getInstance().setRandomSeed((int) seed);
                trainer.initialize(inputShape);
                Map<String, float[]> firstGradients = null;
                for (int step = 0; step < steps; step++) {
                    try (Batch batch = syntheticBatch(trainer.getManager(), inputShape, seed + step)) {
                        EasyTrain.trainBatch(trainer, batch);
                        if (firstGradients == null) {
                            firstGradients = gradients(net);
                        }
                        trainer.step();
                    }
                }
                return new Run(wrapped, firstGradients, weights(net, true), weights(net, false));
            }
        }
    }

    /**
     * Trains the same model {@code steps} SGD steps in FP32 and in FP16 mixed precision ({@link MixedPrecisionBlock}:
     * FP16 working weights and compute, BatchNorm kept in FP32; {@link MixedPrecisionOptimizer}: FP32 masters,
     * dynamic loss scaling) from the same initial weights on the same batches, and returns both loss curves.
     */
    public static PrecisionResult mixedPrecision(Supplier<? extends Block> factory, Shape inputShape, int steps,
            long seed) {
        float[] fp32 = new float[steps];
        float[] fp16 = new float[steps];
        long skipped;
        float scale;
        List<String> islands;
        try (NDManager manager = NDManager.newBaseManager()) {
            for (boolean half : new boolean[] {false, true}) {
                Block block = factory.get();
                Engine.getInstance().setRandomSeed((int) seed);
                block.initialize(manager, DataType.FLOAT32, inputShape); // FP32 first: these become the masters
                Block net = half ? MixedPrecisionBlock.wrap(block) : block;
                MixedPrecisionOptimizer opt = MixedPrecisionOptimizer.builder().setBlock(net)
                        .setOptimizer(Optimizer.sgd().setLearningRateTracker(Tracker.fixed(LEARNING_RATE)).build())
                        .build();
                Loss loss = Loss.softmaxCrossEntropyLoss();
                for (int step = 0; step < steps; step++) {
                    try (NDManager scope = manager.newSubManager(); Batch batch = syntheticBatch(scope, inputShape,
                            seed + step)) {
                        ParameterStore ps = new ParameterStore(scope, false);
                        try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                            NDList out = net.forward(ps, batch.getData(), true); // FP32 logits
                            NDArray value = loss.evaluate(batch.getLabels(), out); // FP32 loss
                            (half ? fp16 : fp32)[step] = value.getFloat();
                            gc.backward(opt.scaleLoss(value));
                        }
                        opt.step(); // unscale, inf/NaN check, FP32 update, FP16 copy
                    }
                }
                if (half) {
                    islands = ((MixedPrecisionBlock) net).fp32Paths();
                    skipped = opt.getLossScaler().getSkippedSteps();
                    scale = opt.getLossScaler().getScale();
                    return new PrecisionResult(fp32, fp16, maxRelativeDiff(fp32, fp16), skipped, scale, islands);
                }
            }
        }
        throw new AssertionError("unreachable");
    }

    /**
     * Quantizes an initialized model in place with {@code config} and measures the relative L2 error of its outputs
     * against the FP32 outputs on one batch.
     */
    public static QuantizeResult quantize(Supplier<? extends Block> factory, Shape inputShape,
            QuantizationConfig config, long seed) {
        try (NDManager manager = NDManager.newBaseManager()) {
            Block block = factory.get();
            Engine.getInstance().setRandomSeed((int) seed);
            block.initialize(manager, DataType.FLOAT32, inputShape);
            try (Batch batch = syntheticBatch(manager, inputShape, seed)) {
                float[] before = predict(block, manager, batch.getData());
                QuantizationReport report = Quantizer.quantize(block, config);
                float[] after = predict(block, manager, batch.getData());
                return new QuantizeResult(config.scheme().id(), report.layers().size(), report.skipped(),
                        report.bytesBefore(), report.bytesAfter(), relativeL2(before, after), report.minSqnrDb());
            }
        }
    }

    /**
     * Quantizes a model, exports it as a quantized artifact to {@code dir}, builds a fresh model of the same
     * architecture (different random weights) and loads the artifact onto it; the fresh model then computes exactly
     * what the quantized one computed.
     */
    public static ExportResult exportAndLoad(Supplier<? extends Block> factory, Shape inputShape,
            QuantizationConfig config, Path dir, long seed) throws IOException {
        try (NDManager manager = NDManager.newBaseManager()) {
            Block trained = factory.get();
            Engine.getInstance().setRandomSeed((int) seed);
            trained.initialize(manager, DataType.FLOAT32, inputShape);
            Quantizer.quantize(trained, config);
            QuantizedArtifact.export(trained, dir, ExportOptions.builder().optArchitecture("user-model").build());

            Block fresh = factory.get(); // e.g. the same `new Mlp(...)` in the serving program
            Engine.getInstance().setRandomSeed((int) seed + 1);
            fresh.initialize(manager, DataType.FLOAT32, inputShape);
            try (Batch batch = syntheticBatch(manager, inputShape, seed)) {
                float[] expected = predict(trained, manager, batch.getData());
                float[] freshBefore = predict(fresh, manager, batch.getData());
                ArtifactManifest manifest = QuantizedArtifact.load(dir, fresh);
                float[] actual = predict(fresh, manager, batch.getData());
                return new ExportResult(dir, directoryBytes(dir), manifest.layers().size(), maxAbsDiff(expected, actual),
                        maxAbsDiff(expected, freshBefore));
            }
        }
    }

    /** Inference forward of {@code block} on {@code input}, flattened. */
    static float[] predict(Block block, NDManager manager, NDList input) {
        try (NDManager scope = manager.newSubManager()) {
            ParameterStore ps = new ParameterStore(scope, false);
            return block.forward(ps, input, false).singletonOrThrow().toType(DataType.FLOAT32, false).toFloatArray();
        }
    }

    /**
     * A deterministic batch of images in [-1, 1) with labels 0..9 (seeded in Java, independent of the engine), on a
     * sub-manager of {@code parent} that closing the batch frees.
     */
    public static Batch syntheticBatch(NDManager parent, Shape inputShape, long seed) {
        NDManager manager = parent.newSubManager();
        Random r = new Random(seed);
        float[] x = new float[(int) inputShape.size()];
        for (int i = 0; i < x.length; i++) {
            x[i] = r.nextFloat() * 2 - 1;
        }
        float[] y = new float[(int) inputShape.get(0)];
        for (int i = 0; i < y.length; i++) {
            y[i] = r.nextInt(10);
        }
        NDList data = new NDList(manager.create(x, inputShape));
        NDList labels = new NDList(manager.create(y, new Shape(y.length)));
        return new Batch(manager, data, labels, y.length, null, null, 0, 1);
    }

    private static Map<String, float[]> gradients(Block net) {
        Map<String, float[]> out = new LinkedHashMap<>();
        for (Map.Entry<String, Parameter> e : Blocks.parameters(net).entrySet()) {
            if (e.getValue().requiresGradient()) {
                try (NDArray g = e.getValue().getArray().getGradient()) {
                    out.put(e.getKey(), g.toFloatArray());
                }
            }
        }
        return out;
    }

    /** Trained parameters, or the others (BatchNorm running mean and variance). */
    private static Map<String, float[]> weights(Block net, boolean trained) {
        Map<String, float[]> out = new LinkedHashMap<>();
        for (Map.Entry<String, Parameter> e : Blocks.parameters(net).entrySet()) {
            if (e.getValue().requiresGradient() == trained) {
                out.put(e.getKey(), e.getValue().getArray().toFloatArray());
            }
        }
        return out;
    }

    static double maxAbs(Map<String, float[]> m) {
        double max = 0;
        for (float[] v : m.values()) {
            for (float f : v) {
                max = Math.max(max, Math.abs(f));
            }
        }
        return max;
    }

    static double maxAbsDiff(Map<String, float[]> a, Map<String, float[]> b) {
        if (!a.keySet().equals(b.keySet())) {
            throw new IllegalStateException("parameter names differ: " + a.keySet() + " vs " + b.keySet());
        }
        double max = 0;
        for (String k : a.keySet()) {
            max = Math.max(max, maxAbsDiff(a.get(k), b.get(k)));
        }
        return max;
    }

    static double maxAbsDiff(float[] a, float[] b) {
        if (a.length != b.length) {
            throw new IllegalStateException("lengths differ: " + a.length + " vs " + b.length);
        }
        double max = 0;
        for (int i = 0; i < a.length; i++) {
            max = Math.max(max, Math.abs(a[i] - b[i]));
        }
        return max;
    }

    static double relativeL2(float[] ref, float[] x) {
        double n = 0;
        double e = 0;
        for (int i = 0; i < ref.length; i++) {
            n += ref[i] * (double) ref[i];
            e += (ref[i] - x[i]) * (double) (ref[i] - x[i]);
        }
        return Math.sqrt(e / n);
    }

    static double maxRelativeDiff(float[] ref, float[] x) {
        double max = 0;
        for (int i = 0; i < ref.length; i++) {
            max = Math.max(max, Math.abs(ref[i] - x[i]) / Math.abs(ref[i]));
        }
        return max;
    }

    static long directoryBytes(Path dir) throws IOException {
        try (Stream<Path> files = Files.list(dir)) {
            long total = 0;
            for (Path f : (Iterable<Path>) files::iterator) {
                total += Files.size(f);
            }
            return total;
        }
    }

    /** Runs every feature on both models and prints the measurements. */
    public static void main(String[] args) throws IOException {
        Path work = args.length > 0 ? Path.of(args[0]) : Files.createTempDirectory("memopt-wrap");
        List<String> lines = new ArrayList<>();
        for (String name : List.of("mlp", "resnet")) {
            Supplier<SequentialBlock> factory = name.equals("mlp") ? MLP : RESNET;
            Shape input = name.equals("mlp") ? MLP_INPUT : RESNET_INPUT;
            CheckpointResult c = checkpointing(factory, input, CheckpointPolicy.sqrtN(), 3, 1);
            lines.add(String.format(Locale.ROOT, "%s checkpointing (sqrtN, %s): max |grad| %.3g, max grad diff %.3g,"
                    + " max weight diff after %d steps %.3g, max BatchNorm running-stat diff %.3g", name,
                    c.checkpointedChildren(), c.maxGradient(), c.maxGradientDiff(), c.steps(),
                    c.maxWeightDiffAfterTraining(), c.maxRunningStatDiffAfterTraining()));
            PrecisionResult p = mixedPrecision(factory, input, 5, 1);
            lines.add(String.format(Locale.ROOT, "%s mixed precision: fp32 losses %s, fp16 losses %s, max relative"
                    + " diff %.2e, skipped %d, loss scale %.0f, FP32 islands %s", name,
                    java.util.Arrays.toString(p.fp32Losses()), java.util.Arrays.toString(p.fp16Losses()),
                    p.maxRelativeLossDiff(), p.skippedSteps(), p.finalLossScale(), p.fp32Islands()));
            for (QuantizationConfig q : List.of(Int8WeightOnlyConfig.builder().build(),
                    Int4WeightOnlyConfig.builder().optGroupSize(128).build())) {
                QuantizeResult r = quantize(factory, input, q, 1);
                lines.add(String.format(Locale.ROOT, "%s %s: %d layers, %d -> %d bytes (%.2fx), relative output"
                        + " error %.4f, min SQNR %.1f dB, skipped %s", name, r.scheme(), r.quantizedLayers(),
                        r.bytesBefore(), r.bytesAfter(), r.bytesBefore() / (double) Math.max(1, r.bytesAfter()),
                        r.relativeOutputError(), r.minSqnrDb(), r.skipped()));
            }
            if (name.equals("mlp")) {
                LoraResult l = lora(factory, input, 4, List.of("1", "3", "5"), 10, 1);
                lines.add(String.format(Locale.ROOT, "mlp LoRA r=4 on %s: %d of %d parameters trainable, loss %.4f ->"
                        + " %.4f in 10 steps, frozen weights moved by %.3g, merged vs adapted outputs %.3g",
                        l.adapted(), l.trainableParameters(), l.totalParameters(), l.firstLoss(), l.lastLoss(),
                        l.maxFrozenWeightChange(), l.maxMergedOutputDiff()));
            }
            ExportResult e = exportAndLoad(factory, input, Int8WeightOnlyConfig.builder().build(),
                    work.resolve(name + "-int8"), 1);
            lines.add(String.format(Locale.ROOT, "%s export: %s, %d bytes, %d quantized layers, loaded onto a fresh"
                    + " model: max output diff %.3g (before loading: %.3g)", name, e.dir(), e.artifactBytes(),
                    e.quantizedLayers(), e.maxOutputDiff(), e.freshVsQuantizedBeforeLoad()));
        }
        lines.forEach(System.out::println);
    }
}
