package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingGradientCollector;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.memopt.precision.MixedPrecisionOptimizer;
import ai.djl.memopt.precision.Precisions;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import ai.djl.training.optimizer.Optimizer;
import ai.djl.training.tracker.Tracker;
import com.google.gson.JsonObject;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.lang.management.ManagementFactory;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.Random;
import java.util.concurrent.Callable;
import java.util.concurrent.TimeUnit;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;

/**
 * {@code memopt bench train}: memory and time of DeepSeek training steps for each combination of
 * {@code --checkpointing} and {@code --precision}, each in a fresh JVM (the peak resident set, {@code VmHWM}, cannot be
 * reset within a process). One JSON line per configuration.
 *
 * <pre>
 * memopt bench train --preset bench-tiny --batch 4 --seq 256 --steps 3 --checkpointing none,all --precision fp32,fp16
 * </pre>
 *
 * <p>Figures per configuration: {@code model_rss_mb} (after building the model and optimizer), {@code peak_rss_mb}
 * ({@code VmHWM} at the end), {@code step_peak_over_model_mb} (their difference: activations, gradients, optimizer
 * state and temporaries), {@code forward_rss_mb} (largest RSS growth across a training forward, i.e. what the forward
 * keeps for backward) and {@code ms_per_step} after {@code --warmup} steps. On a GPU device the RSS figures describe
 * host memory only.
 */
@Command(name = "train", mixinStandardHelpOptions = true,
        description = "Peak memory and time of training steps per checkpointing/precision setting (fresh JVM each).")
public final class BenchTrainCommand implements Callable<Integer> {

    @Option(names = "--preset", paramLabel = "NAME", description = "Random model of a preset (default bench-tiny).")
    String preset;

    @Option(names = "--model", paramLabel = "DIR", description = "Hugging Face model directory instead of a preset.")
    Path model;

    @Option(names = "--batch", defaultValue = "4", paramLabel = "N", description = "Sequences per step (default 4).")
    int batch;

    @Option(names = "--seq", defaultValue = "128", paramLabel = "N", description = "Tokens per sequence (default 128).")
    int seq;

    @Option(names = "--steps", defaultValue = "3", paramLabel = "N", description = "Measured steps (default 3).")
    int steps;

    @Option(names = "--warmup", defaultValue = "1", paramLabel = "N", description = "Unmeasured steps (default 1).")
    int warmup;

    @Option(names = "--checkpointing", defaultValue = "none,all", paramLabel = "LIST",
            description = "Comma-separated settings among none, all, every:N (default none,all).")
    String checkpointing;

    @Option(names = "--precision", defaultValue = "fp32", paramLabel = "LIST",
            description = "Comma-separated settings among fp32, fp16 (default fp32).")
    String precision;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "Device (default cpu).")
    String device;

    @Option(names = "--seed", defaultValue = "0", paramLabel = "N", description = "Seed of weights and tokens.")
    long seed;

    @Option(names = "--timeout", defaultValue = "900", paramLabel = "SECONDS",
            description = "Per-configuration time limit (default 900).")
    long timeout;

    @Option(names = "--in-process", description = "Run exactly one configuration in this JVM (used by the children).")
    boolean inProcess;

    @Option(names = "--json", description = "Accepted for consistency: output is always JSON lines.")
    boolean json;

    @Override
    public Integer call() throws Exception {
        if ((preset == null) == (model == null)) {
            if (preset == null) {
                preset = "bench-tiny";
            } else {
                throw new IllegalArgumentException("give --preset or --model, not both");
            }
        }
        if (batch < 1 || seq < 2 || steps < 1 || warmup < 0 || timeout < 1) {
            throw new IllegalArgumentException(String.format(Locale.ROOT,
                    "need --batch >= 1, --seq >= 2, --steps >= 1, --warmup >= 0, --timeout >= 1; got %d, %d, %d, %d,"
                            + " %d", batch, seq, steps, warmup, timeout));
        }
        String[] ckpts = checkpointing.split(",");
        String[] precs = precision.split(",");
        for (String c : ckpts) {
            FinetuneCommand.parsePolicy(c); // fail before spawning anything
        }
        for (String p : precs) {
            Precisions.parse(p);
        }
        if (inProcess) {
            if (ckpts.length != 1 || precs.length != 1) {
                throw new IllegalArgumentException("--in-process runs one configuration: give one --checkpointing and"
                        + " one --precision");
            }
            System.out.println(runOne(ckpts[0].trim(), precs[0].trim()));
            return 0;
        }
        int failures = 0;
        for (String p : precs) {
            for (String c : ckpts) {
                failures += spawn(c.trim(), p.trim()) ? 0 : 1;
            }
        }
        return failures == 0 ? 0 : 1;
    }

    /** Runs one configuration in a child JVM and forwards its JSON line; false if it failed. */
    private boolean spawn(String ckpt, String prec) throws Exception {
        List<String> cmd = new ArrayList<>();
        cmd.add(ProcessHandle.current().info().command().orElse("java"));
        for (String arg : ManagementFactory.getRuntimeMXBean().getInputArguments()) {
            if (arg.startsWith("-X") || arg.startsWith("-Dai.djl") || arg.startsWith("-Dmemopt")) {
                cmd.add(arg);
            }
        }
        cmd.add("-cp");
        cmd.add(System.getProperty("java.class.path"));
        cmd.add(MemoptCli.class.getName());
        cmd.add("bench");
        cmd.add("train");
        cmd.add("--in-process");
        if (model != null) {
            cmd.add("--model");
            cmd.add(model.toString());
        } else {
            cmd.add("--preset");
            cmd.add(preset);
        }
        for (String[] kv : new String[][] {{"--batch", "" + batch}, {"--seq", "" + seq}, {"--steps", "" + steps},
            {"--warmup", "" + warmup}, {"--checkpointing", ckpt}, {"--precision", prec}, {"--device", device},
            {"--seed", "" + seed}}) {
            cmd.add(kv[0]);
            cmd.add(kv[1]);
        }
        Process child = new ProcessBuilder(cmd).redirectErrorStream(false).start();
        StringBuilder err = new StringBuilder();
        Thread drain = new Thread(() -> {
            try (BufferedReader r = new BufferedReader(
                    new InputStreamReader(child.getErrorStream(), StandardCharsets.UTF_8))) {
                String line;
                while ((line = r.readLine()) != null) {
                    if (!line.contains(" WARN ") && !line.contains(" INFO ")) {
                        err.append(line).append('\n');
                    }
                }
            } catch (java.io.IOException ignored) {
                // the child is gone
            }
        });
        drain.start();
        String result = null;
        try (BufferedReader r = new BufferedReader(
                new InputStreamReader(child.getInputStream(), StandardCharsets.UTF_8))) {
            String line;
            while ((line = r.readLine()) != null) {
                if (line.startsWith("{")) {
                    result = line;
                }
            }
        }
        if (!child.waitFor(timeout, TimeUnit.SECONDS)) {
            child.destroyForcibly();
            System.err.println("memopt bench train: " + ckpt + "/" + prec + " timed out after " + timeout + " s");
            return false;
        }
        drain.join();
        if (child.exitValue() != 0 || result == null) {
            System.err.println("memopt bench train: " + ckpt + "/" + prec + " failed (exit " + child.exitValue()
                    + "): " + err.toString().trim());
            return false;
        }
        System.out.println(result);
        return true;
    }

    private String runOne(String ckpt, String prec) throws Exception {
        CheckpointPolicy policy = FinetuneCommand.parsePolicy(ckpt);
        DataType compute = Precisions.parse(prec);
        Device dev = PerplexityCommand.parseDevice(device);
        try (DeepSeekForCausalLM lm = model != null
                ? DeepSeekLoader.load(model, dev, DataType.FLOAT32)
                : DeepSeekForCausalLM.random(DeepSeekConfig.preset(preset), seed, dev, DataType.FLOAT32)) {
            DeepSeekConfig config = lm.config();
            long params = 0;
            for (ai.djl.nn.Parameter p : Blocks.parameters(lm).values()) {
                params += p.getArray().size();
            }
            if (policy != null) {
                Checkpointing.wrapChildren(Blocks.get(lm, "model.layers"), policy);
            }
            Block trained = lm;
            DynamicLossScaler scaler = DynamicLossScaler.builder().optInitialScale(1).optMinScale(1).optMaxScale(1)
                    .build();
            if (compute == DataType.FLOAT16) {
                trained = MixedPrecisionBlock.wrap(lm, FinetuneCommand.deepSeekFp16Policy());
                scaler = DynamicLossScaler.create();
            }
            MixedPrecisionOptimizer opt = MixedPrecisionOptimizer.builder().setBlock(trained)
                    .setOptimizer(Optimizer.adamW().optLearningRateTracker(Tracker.fixed(1e-4f)).build())
                    .optLossScaler(scaler).build();
            Random random = new Random(seed);
            long modelRss = -1;
            long forwardRss = 0;
            long measuredNanos = 0;
            float firstLoss = Float.NaN;
            float lastLoss = Float.NaN;
            for (int step = 0; step < warmup + steps; step++) {
                long[] ids = new long[batch * seq];
                for (int i = 0; i < ids.length; i++) {
                    ids[i] = random.nextInt(config.vocabSize());
                }
                if (step == 0) {
                    // optimizer state is created lazily by the first update: count it in the baseline from step 1
                    modelRss = MemoryStats.residentBytes();
                }
                long start = System.nanoTime();
                float loss;
                try (NDManager m = lm.manager().newSubManager();
                        GradientCollector gc = policy != null
                                ? CheckpointingGradientCollector.open(m)
                                : m.getEngine().newGradientCollector()) {
                    NDArray input = m.create(ids, new Shape(batch, seq)).toDevice(dev, false); // (B, T)
                    long before = MemoryStats.residentBytes();
                    NDArray logits = trained.forward(new ParameterStore(m, false), new NDList(input), true).head();
                    NDArray l = CausalLmLoss.mean(logits, input);
                    loss = l.getFloat();
                    forwardRss = Math.max(forwardRss, MemoryStats.residentBytes() - before);
                    gc.backward(opt.scaleLoss(l));
                }
                opt.step();
                if (step >= warmup) {
                    measuredNanos += System.nanoTime() - start;
                }
                if (step == 0) {
                    firstLoss = loss;
                }
                lastLoss = loss;
            }
            long peak = MemoryStats.peakResidentBytes();
            JsonObject o = new JsonObject();
            o.addProperty("bench", "train");
            o.addProperty("model", model != null ? model.toString() : preset);
            o.addProperty("parameters", params);
            o.addProperty("layers", config.numHiddenLayers());
            o.addProperty("batch", batch);
            o.addProperty("seq", seq);
            o.addProperty("checkpointing", ckpt);
            o.addProperty("precision", prec);
            o.addProperty("device", dev.isGpu() ? "gpu" + dev.getDeviceId() : "cpu");
            o.addProperty("steps", steps);
            o.addProperty("ms_per_step", measuredNanos / 1e6 / steps);
            o.addProperty("model_rss_mb", modelRss / 1e6);
            o.addProperty("peak_rss_mb", peak / 1e6);
            o.addProperty("step_peak_over_model_mb", (peak - modelRss) / 1e6);
            o.addProperty("forward_rss_mb", forwardRss / 1e6);
            o.addProperty("first_loss", firstLoss);
            o.addProperty("last_loss", lastLoss);
            o.addProperty("skipped_steps", scaler.getSkippedSteps());
            return o.toString();
        }
    }
}
