package ai.djl.memopt.examples.demo;

import ai.djl.Device;
import ai.djl.memopt.examples.cli.ProgressBar;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.LearningRateSchedule;
import ai.djl.memopt.finetune.StatefulOptimizer;
import ai.djl.memopt.finetune.StepResult;
import ai.djl.memopt.finetune.TokenDataset;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;

/**
 * The demo's fine-tuning: the main run of a {@link TrainingPlan} (activation checkpointing on every decoder layer,
 * FP32 or FP16 mixed precision), and beside an FP32 main run the FP16 showcase: the same model, seed, schedule and
 * batches for a few steps in FP16 with FP32 masters and dynamic loss scaling, its losses compared step by step with
 * the FP32 run's.
 */
public final class DemoTraining {

    /**
     * What the training did.
     *
     * @param lossCurve the main run's {step, loss, skipped} triples
     * @param tokensPerSecond the main run's throughput
     * @param showcase the FP16 showcase, or null when the main run was FP16
     */
    public record Result(List<double[]> lossCurve, double tokensPerSecond, Showcase showcase) {}

    /**
     * The FP16 showcase against the FP32 run's first steps.
     *
     * @param steps steps run
     * @param maxRelativeLossDifference the largest {@code |loss16 - loss32| / loss32} over the steps
     * @param fp16TokensPerSecond FP16's throughput over the steps
     * @param fp32TokensPerSecond FP32's throughput over the same first steps
     * @param skippedSteps steps the loss scaler skipped for an overflow
     * @param finalLossScale the loss scale after the last step
     * @param lossCurve the FP16 run's {step, loss, skipped} triples
     */
    public record Showcase(int steps, double maxRelativeLossDifference, double fp16TokensPerSecond,
            double fp32TokensPerSecond, int skippedSteps, float finalLossScale, List<double[]> lossCurve) {

        @Override
        public String toString() {
            return String.format(Locale.ROOT, "FP16 mixed precision, %d steps from the same start (FP32 masters,"
                    + " dynamic loss scaling, checkpointing): losses within %.2f%% of FP32's, %d skipped for overflow,"
                    + " loss scale %.0f; %.0f tokens/s against FP32's %.0f", steps, 100 * maxRelativeLossDifference,
                    skippedSteps, finalLossScale, fp16TokensPerSecond, fp32TokensPerSecond);
        }
    }

    private final DeepSeekConfig config;
    private final Device device;
    private final TokenDataset dataset;
    private final int batch;
    private final float lr;
    private final long seed;
    private final PrintStream progress;

    /**
     * @param progress where progress bars go, or null for none
     */
    public DemoTraining(DeepSeekConfig config, Device device, TokenDataset dataset, int batch, float lr, long seed,
            PrintStream progress) {
        this.config = config;
        this.device = device;
        this.dataset = dataset;
        this.batch = batch;
        this.lr = lr;
        this.seed = seed;
        this.progress = progress;
    }

    /** Runs the plan and saves the main run's model to {@code modelDir} (Hugging Face layout, FP32). */
    public Result run(TrainingPlan plan, Path modelDir) throws IOException {
        List<double[]> curve = new ArrayList<>();
        double tokensPerSecond;
        double[] early = new double[2]; // seconds and tokens of the first fp16Steps steps
        try (NDManager weights = NDManager.newBaseManager(device);
                FineTuner tuner = tuner(weights, plan.precision(), plan.steps())) {
            tokensPerSecond = train(tuner, plan.steps(), "train", curve, plan.fp16Steps(), early);
            tuner.saveModel(modelDir);
        }
        if (plan.fp16Steps() == 0) {
            return new Result(curve, tokensPerSecond, null);
        }
        List<double[]> fp16 = new ArrayList<>();
        int skipped;
        float scale;
        double fp16TokensPerSecond;
        try (NDManager weights = NDManager.newBaseManager(device);
                FineTuner tuner = tuner(weights, FineTuner.Precision.FP16, plan.steps())) {
            fp16TokensPerSecond = train(tuner, plan.fp16Steps(), "fp16", fp16, 0, null);
            scale = tuner.lossScale();
        }
        skipped = (int) fp16.stream().filter(p -> p[2] != 0).count();
        double worst = 0;
        for (int i = 0; i < fp16.size(); i++) {
            worst = Math.max(worst, Math.abs(fp16.get(i)[1] - curve.get(i)[1]) / curve.get(i)[1]);
        }
        double fp32Early = early[1] / early[0];
        return new Result(curve, tokensPerSecond,
                new Showcase(plan.fp16Steps(), worst, fp16TokensPerSecond, fp32Early, skipped, scale, fp16));
    }

    /**
     * The fine-tuner of one run: a fresh model from the seed, checkpointing on every decoder layer, AdamW, the
     * schedule of a {@code totalSteps} run (so the showcase's first steps see the main run's learning rates).
     */
    private FineTuner tuner(NDManager weights, FineTuner.Precision precision, int totalSteps) {
        return tuner(config, seed, lr, weights, precision, StatefulOptimizer.Kind.ADAMW, totalSteps);
    }

    /**
     * The demo's fine-tuner with another optimizer ({@code memopt bench optimizers} compares them on it): a fresh
     * model from {@code seed} in {@code weights}, checkpointing on every decoder layer, a warm-up of 5% of
     * {@code totalSteps} to {@code lr}, then cosine decay to a tenth of it.
     */
    public static FineTuner tuner(DeepSeekConfig config, long seed, float lr, NDManager weights,
            FineTuner.Precision precision, StatefulOptimizer.Kind optimizer, int totalSteps) {
        DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(config, seed, weights, DataType.FLOAT32);
        return FineTuner.builder().setModel(lm).optCheckpointing("all").optPrecision(precision)
                .optOptimizer(optimizer)
                .optSchedule(LearningRateSchedule.of(lr, Math.max(1, totalSteps / 20), totalSteps, 0.1f))
                .optSeed(seed).build();
    }

    /**
     * Runs {@code steps} steps, adding {step, loss, skipped} to {@code curve}; returns tokens per second. With
     * {@code markAt > 0}, {@code mark} receives the seconds and tokens of the first {@code markAt} steps.
     */
    private double train(FineTuner tuner, int steps, String label, List<double[]> curve, int markAt,
            double[] mark) {
        ProgressBar bar = progress == null ? null : new ProgressBar(progress, label, steps);
        long t0 = System.nanoTime();
        long tokens = 0;
        while (tuner.step() < steps) {
            StepResult r = tuner.step(dataset.trainBatch(tuner.dataPosition(), batch));
            tokens += r.tokens();
            curve.add(new double[] {r.step(), r.loss(), r.skipped() ? 1 : 0});
            if (markAt > 0 && r.step() == markAt) {
                mark[0] = (System.nanoTime() - t0) / 1e9;
                mark[1] = tokens;
            }
            if (bar != null) {
                double tps = tokens / ((System.nanoTime() - t0) / 1e9);
                bar.update(r.step(), tuner.precision() == FineTuner.Precision.FP16
                        ? String.format(Locale.ROOT, "loss %.3f  %.0f tok/s  scale %.0f  mem %.0f MB", r.loss(), tps,
                                r.lossScale(), MemoryStats.deviceBytesInUse(device) / 1e6)
                        : String.format(Locale.ROOT, "loss %.3f  %.0f tok/s  mem %.0f MB", r.loss(), tps,
                                MemoryStats.deviceBytesInUse(device) / 1e6));
            }
        }
        if (bar != null) {
            bar.finish();
        }
        return tokens / ((System.nanoTime() - t0) / 1e9);
    }
}
