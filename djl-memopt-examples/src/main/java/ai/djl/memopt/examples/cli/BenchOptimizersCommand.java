package ai.djl.memopt.examples.cli;

import ai.djl.memopt.examples.bench.FreshJvm;
import ai.djl.memopt.examples.bench.LineChart;
import ai.djl.memopt.examples.bench.MarkdownTable;
import ai.djl.memopt.examples.bench.OptimizerBenchWorker;
import ai.djl.memopt.examples.demo.ByteLevelBpeTrainer;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.StatefulOptimizer;
import ai.djl.memopt.safetensors.AtomicFiles;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.LocalDate;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Locale;
import java.util.Set;
import java.util.concurrent.Callable;
import picocli.CommandLine.Command;
import picocli.CommandLine.Mixin;
import picocli.CommandLine.Option;

/**
 * {@code memopt bench optimizers}: the quality of the optimizers on the demo's model. A byte-level BPE vocabulary is
 * trained on the training texts as the demo trains it; then, for each optimizer, in a fresh JVM running
 * {@link OptimizerBenchWorker}, the demo's model starts from the same seed and trains on the same batches with the
 * demo's schedule, the held-out text scored as the demo scores it (consecutive windows of {@code --seq} tokens) every
 * {@code --eval-every} steps. One JSON line per optimizer: the settings, {@code final_train_loss} (mean of the last 10
 * steps), {@code heldout_loss}, {@code heldout_perplexity}, {@code heldout_loss_vs_adamw} (relative), the optimizer's
 * state bytes, tokens/s, and the curves ({@code train_loss} per step, {@code heldout} as {@code [step, loss]} pairs).
 *
 * <pre>
 * memopt bench optimizers --data ../shared/data/sotu --steps 300 --out docs/benchmarks.md \
 *     --chart docs/img/bench-optimizers.png
 * </pre>
 */
@Command(name = "optimizers", mixinStandardHelpOptions = true,
        description = "Held-out loss of the demo's model fine-tuned with each optimizer (adamw, adamw8bit, ...) from"
                + " the same seed on the same batches, each in a fresh JVM; --chart draws the loss curves.")
public final class BenchOptimizersCommand implements Callable<Integer> {

    static final String TABLE = "bench-optimizers";
    static final List<String> HEADER = List.of("optimizer", "precision", "steps", "batch x seq",
            "train loss (last 10 steps)", "held-out loss", "held-out perplexity", "held-out loss vs adamw",
            "optimizer state MB", "tokens/s", "date");
    static final List<String> ALIGN = List.of("---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:",
            "---:", "---");
    /** The demo's held-out address. */
    static final String DEMO_HELD_OUT = "1972_richard_nixon_r.txt";
    /** Steps averaged for each point of the chart's training curves (one step's loss is one batch's). */
    static final int SMOOTHING = 10;

    @Option(names = "--data", required = true, paramLabel = "DIR|FILE",
            description = "Training text: a directory of .txt files, or one file.")
    Path data;

    @Option(names = "--held-out", defaultValue = DEMO_HELD_OUT, paramLabel = "FILE",
            description = "Held-out text: a file of --data (left out of training; default ${DEFAULT-VALUE}, the"
                    + " demo's held-out address) or a path.")
    String heldOut;

    @Option(names = "--optimizers", split = ",", defaultValue = "adamw,adamw8bit", paramLabel = "NAME",
            description = "Optimizers to compare (default adamw,adamw8bit; also adam, sgd).")
    List<String> optimizers;

    @Option(names = "--steps", defaultValue = "300", paramLabel = "N", description = "Training steps (default 300).")
    int steps;

    @Option(names = "--eval-every", defaultValue = "25", paramLabel = "N",
            description = "Score the held-out text every N steps, and before the first and after the last"
                    + " (default 25).")
    int evalEvery;

    @Option(names = "--dtype", defaultValue = "fp32", paramLabel = "fp32|fp16",
            description = "Training precision (default fp32; fp16: FP16 compute with FP32 masters and loss scaling).")
    String dtype;

    @Mixin DemoModelOptions demoModel = new DemoModelOptions();

    @Option(names = "--seed", defaultValue = "7", paramLabel = "S",
            description = "Weights and data-order seed, the same for every optimizer (default 7, the demo's).")
    long seed;

    @Mixin BenchOptions bench = new BenchOptions("1g", 7200);

    @Override
    public Integer call() throws Exception {
        bench.validate();
        if (steps < 2) {
            throw new IllegalArgumentException("--steps must be at least 2 (the demo's schedule warms up, then decays),"
                    + " got " + steps);
        }
        if (evalEvery < 1) {
            throw new IllegalArgumentException("--eval-every must be at least 1, got " + evalEvery);
        }
        demoModel.validate();
        int batch = demoModel.batch;
        int seq = demoModel.seq;
        int vocab = demoModel.vocab;
        String precision;
        try {
            precision = FineTuner.Precision.parse(dtype).name().toLowerCase(Locale.ROOT);
        } catch (IllegalArgumentException e) {
            throw new IllegalArgumentException("--dtype: " + e.getMessage(), e);
        }
        Set<String> kinds = new LinkedHashSet<>();
        for (String name : optimizers) {
            try {
                kinds.add(StatefulOptimizer.Kind.parse(name).name().toLowerCase(Locale.ROOT));
            } catch (IllegalArgumentException e) {
                throw new IllegalArgumentException("--optimizers: " + e.getMessage(), e);
            }
        }
        if (!Files.exists(data)) {
            throw new IllegalArgumentException("--data " + data + " does not exist");
        }
        Path heldOutFile = resolveHeldOut();
        // a model this small runs fastest on one PyTorch thread (DemoCommand measured it); the workers inherit it
        if (System.getProperty("ai.djl.pytorch.num_threads") == null) {
            System.setProperty("ai.djl.pytorch.num_threads", "1");
            System.setProperty("ai.djl.pytorch.num_interop_threads", "1");
        }
        List<String> texts = OptimizerBenchWorker.trainingTexts(data, heldOutFile);
        List<JsonObject> results = new ArrayList<>();
        Path work = Files.createTempDirectory("memopt-bench-optimizers-");
        try {
            System.err.printf(Locale.ROOT, "bench optimizers: byte-level BPE with %d tokens trained on %d texts%n",
                    vocab, texts.size());
            ByteLevelBpeTrainer.train(texts, vocab).writeTo(work);
            for (String kind : kinds) {
                OptimizerBenchWorker.Settings settings = new OptimizerBenchWorker.Settings(work, data, heldOutFile,
                        kind, precision, steps, evalEvery, batch, seq, vocab, demoModel.hidden, demoModel.layers,
                        demoModel.lr, seed);
                List<String> lines = FreshJvm.run(List.of("-Xmx" + bench.heap), BenchTrainCommand.ALLOCATOR,
                        bench.timeout, OptimizerBenchWorker.class, List.of(settings.toJson().toString()));
                results.add(BenchGenerateCommand.lastJson(lines, kind));
            }
        } finally {
            AtomicFiles.deleteTree(work);
        }
        Double reference = null;
        for (JsonObject r : results) {
            if (r.get("optimizer").getAsString().equals("adamw")) {
                reference = r.get("heldout_loss").getAsDouble();
            }
        }
        List<List<String>> rows = new ArrayList<>();
        String date = LocalDate.now(ZoneOffset.UTC).toString();
        for (JsonObject r : results) {
            double loss = r.get("heldout_loss").getAsDouble();
            if (reference != null) {
                r.addProperty("heldout_loss_vs_adamw", loss / reference - 1);
            }
            System.out.println(r);
            rows.add(List.of(r.get("optimizer").getAsString(), precision, Integer.toString(steps),
                    batch + " x " + seq, String.format(Locale.ROOT, "%.4f", r.get("final_train_loss").getAsDouble()),
                    String.format(Locale.ROOT, "%.4f", loss),
                    String.format(Locale.ROOT, "%.2f", r.get("heldout_perplexity").getAsDouble()),
                    reference == null ? "-" : String.format(Locale.ROOT, "%+.2f%%", 100 * (loss / reference - 1)),
                    String.format(Locale.ROOT, "%.2f", r.get("optimizer_state_bytes").getAsLong() / 1e6),
                    String.format(Locale.ROOT, "%.0f", r.get("tokens_per_second").getAsDouble()), date));
        }
        if (bench.out != null) {
            MarkdownTable.update(bench.out, TABLE, HEADER, ALIGN, 4, rows);
        }
        if (bench.chart != null) {
            LineChart.write(bench.chart, String.format(Locale.ROOT, "Demo model, %d steps of %d x %d tokens, %s",
                    steps, batch, seq, precision.toUpperCase(Locale.ROOT)), "step", "loss (nats per token)",
                    curves(results));
        }
        return 0;
    }

    /** Each optimizer's training loss (a trailing mean over {@link #SMOOTHING} steps) and held-out points. */
    static List<LineChart.Series> curves(List<JsonObject> results) {
        List<LineChart.Series> series = new ArrayList<>();
        for (int k = 0; k < results.size(); k++) {
            JsonObject r = results.get(k);
            String name = r.get("optimizer").getAsString();
            JsonArray train = r.getAsJsonArray("train_loss");
            double[] x = new double[train.size()];
            double[] y = new double[train.size()];
            double sum = 0;
            for (int i = 0; i < train.size(); i++) {
                sum += train.get(i).getAsDouble() - (i >= SMOOTHING ? train.get(i - SMOOTHING).getAsDouble() : 0);
                x[i] = i + 1;
                y[i] = sum / Math.min(i + 1, SMOOTHING);
            }
            series.add(new LineChart.Series(name + " train (" + SMOOTHING + "-step mean)", x, y, false, k));
            JsonArray held = r.getAsJsonArray("heldout");
            double[] hx = new double[held.size()];
            double[] hy = new double[held.size()];
            for (int i = 0; i < held.size(); i++) {
                hx[i] = held.get(i).getAsJsonArray().get(0).getAsDouble();
                hy[i] = held.get(i).getAsJsonArray().get(1).getAsDouble();
            }
            series.add(new LineChart.Series(name + " held-out", hx, hy, true, k));
        }
        return series;
    }

    /** {@code --held-out}: a file of {@code --data}'s directory, else a path. */
    private Path resolveHeldOut() {
        Path dir = Files.isDirectory(data) ? data : data.toAbsolutePath().getParent();
        Path inData = dir.resolve(heldOut);
        if (Files.isRegularFile(inData)) {
            return inData;
        }
        Path path = Path.of(heldOut);
        if (Files.isRegularFile(path)) {
            return path;
        }
        throw new IllegalArgumentException("--held-out " + heldOut + ": neither a file of --data " + data
                + " nor a file");
    }
}
