package ai.djl.memopt.examples.bench;

import ai.djl.Device;
import ai.djl.memopt.examples.cli.DemoCommand;
import ai.djl.memopt.examples.cli.PerplexityCommand;
import ai.djl.memopt.examples.cli.ProgressBar;
import ai.djl.memopt.examples.demo.DemoTraining;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.StateBytes;
import ai.djl.memopt.finetune.StatefulOptimizer;
import ai.djl.memopt.finetune.StepResult;
import ai.djl.memopt.finetune.TextCorpus;
import ai.djl.memopt.finetune.TokenDataset;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.ndarray.NDManager;
import com.google.common.base.Preconditions;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;

/**
 * One optimizer of {@code memopt bench optimizers} in a JVM of its own: the demo's model
 * ({@link DemoCommand#demoConfig}, {@link DemoTraining#tuner}: fresh weights from the seed, checkpointing on every
 * decoder layer, the demo's schedule) trained on the training texts with the given optimizer, the held-out text scored as the demo scores it
 * ({@link PerplexityCommand#evaluate} in consecutive windows of {@code seq} tokens) before the first step, every
 * {@code evalEvery} steps and after the last. Prints one JSON line.
 *
 * <p>Argument: the {@link Settings} as one JSON object ({@link Settings#toJson}).
 */
public final class OptimizerBenchWorker {

    /** Training steps whose losses are averaged for {@code final_train_loss} (one step's loss is one batch's). */
    public static final int FINAL_LOSS_STEPS = 10;

    /**
     * What one run trains.
     *
     * @param tokenizerDir a directory with the {@code tokenizer.json} trained on the training texts
     * @param data a {@code .txt} file or a directory of them
     * @param heldOut the held-out text; left out of the training texts when it is one of {@code data}'s files
     * @param optimizer the optimizer kind ({@code adamw}, {@code adamw8bit}, ...)
     * @param precision {@code fp32} or {@code fp16}
     */
    public record Settings(Path tokenizerDir, Path data, Path heldOut, String optimizer, String precision, int steps,
            int evalEvery, int batch, int seq, int vocab, int hidden, int layers, float lr, long seed) {

        public JsonObject toJson() {
            JsonObject o = new JsonObject();
            o.addProperty("tokenizer_dir", tokenizerDir.toString());
            o.addProperty("data", data.toString());
            o.addProperty("held_out", heldOut.toString());
            o.addProperty("optimizer", optimizer);
            o.addProperty("precision", precision);
            o.addProperty("steps", steps);
            o.addProperty("eval_every", evalEvery);
            o.addProperty("batch", batch);
            o.addProperty("seq", seq);
            o.addProperty("vocab", vocab);
            o.addProperty("hidden", hidden);
            o.addProperty("layers", layers);
            o.addProperty("lr", lr);
            o.addProperty("seed", seed);
            return o;
        }

        static Settings fromJson(JsonObject o) {
            return new Settings(Path.of(o.get("tokenizer_dir").getAsString()), Path.of(o.get("data").getAsString()),
                    Path.of(o.get("held_out").getAsString()), o.get("optimizer").getAsString(),
                    o.get("precision").getAsString(), o.get("steps").getAsInt(), o.get("eval_every").getAsInt(),
                    o.get("batch").getAsInt(), o.get("seq").getAsInt(), o.get("vocab").getAsInt(),
                    o.get("hidden").getAsInt(), o.get("layers").getAsInt(), o.get("lr").getAsFloat(),
                    o.get("seed").getAsLong());
        }
    }

    private OptimizerBenchWorker() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: OptimizerBenchWorker SETTINGS_JSON");
            System.exit(2);
        }
        System.out.println(run(Settings.fromJson(JsonParser.parseString(args[0]).getAsJsonObject()), System.err));
    }

    /**
     * The training texts: {@code data}'s {@code .txt} files (or the file itself) in name order, without the held-out
     * file.
     *
     * @throws IllegalArgumentException if no training text is left
     */
    public static List<String> trainingTexts(Path data, Path heldOut) throws IOException {
        TextCorpus corpus = TextCorpus.read(data);
        Path dir = Files.isDirectory(data) ? data : data.toAbsolutePath().getParent();
        List<String> texts = new ArrayList<>();
        for (int i = 0; i < corpus.size(); i++) {
            if (!Files.isSameFile(dir.resolve(corpus.names().get(i)), heldOut)) {
                texts.add(corpus.texts().get(i));
            }
        }
        Preconditions.checkArgument(!texts.isEmpty(), "--data %s has no .txt file besides the held-out %s", data,
                heldOut);
        return texts;
    }

    /**
     * Trains and evaluates; progress (a bar, and a line per evaluation) goes to {@code progress} if not null.
     *
     * @return the result: the settings' fields, the curves ({@code train_loss} per step, {@code heldout} as
     *     {@code [step, loss]} pairs) and the summary figures
     */
    public static JsonObject run(Settings s, PrintStream progress) throws IOException {
        StatefulOptimizer.Kind kind = StatefulOptimizer.Kind.parse(s.optimizer());
        FineTuner.Precision precision = FineTuner.Precision.parse(s.precision());
        TokenDataset dataset = TokenDataset.tokenize(TextCorpus.of(trainingTexts(s.data(), s.heldOut())),
                s.tokenizerDir().resolve("tokenizer.json"), s.seq(), 0.0, s.seed());
        long[] heldOutIds = PerplexityCommand.tokenize(s.tokenizerDir(), s.heldOut());
        DeepSeekConfig config = DemoCommand.demoConfig(s.vocab(), s.hidden(), s.layers(), s.seq());
        String label = kind.name().toLowerCase(Locale.ROOT);

        double[] trainLoss = new double[s.steps()];
        JsonArray heldOutCurve = new JsonArray();
        PerplexityCommand.Evaluation last;
        StateBytes state;
        double trainSeconds = 0;
        long tokens = 0;
        int skipped = 0;
        try (NDManager weights = NDManager.newBaseManager(Device.cpu());
                FineTuner tuner = DemoTraining.tuner(config, s.seed(), s.lr(), weights, precision, kind, s.steps())) {
            last = evaluate(tuner, heldOutIds, s.seq(), heldOutCurve, progress, label);
            ProgressBar bar = progress == null ? null : new ProgressBar(progress, label, s.steps());
            while (tuner.step() < s.steps()) {
                long t0 = System.nanoTime();
                StepResult r = tuner.step(dataset.trainBatch(tuner.dataPosition(), s.batch()));
                trainSeconds += (System.nanoTime() - t0) / 1e9;
                tokens += r.tokens();
                skipped += r.skipped() ? 1 : 0;
                trainLoss[(int) r.step() - 1] = r.loss();
                if (bar != null) {
                    bar.update(r.step(), String.format(Locale.ROOT, "loss %.3f  %.0f tok/s", r.loss(),
                            tokens / trainSeconds));
                }
                if (r.step() % s.evalEvery() == 0 || r.step() == s.steps()) {
                    last = evaluate(tuner, heldOutIds, s.seq(), heldOutCurve, null, label);
                }
            }
            if (bar != null) {
                bar.finish();
            }
            state = tuner.stateBytes();
        }

        JsonObject o = new JsonObject();
        o.addProperty("optimizer", label);
        o.addProperty("precision", precision.name().toLowerCase(Locale.ROOT));
        o.addProperty("steps", s.steps());
        o.addProperty("batch", s.batch());
        o.addProperty("seq", s.seq());
        o.addProperty("vocab", s.vocab());
        o.addProperty("hidden", s.hidden());
        o.addProperty("layers", s.layers());
        o.addProperty("lr", s.lr());
        o.addProperty("seed", s.seed());
        o.addProperty("parameters", config.parameterCount());
        o.addProperty("train_tokens", dataset.tokenCount());
        o.addProperty("epochs", (double) s.steps() * s.batch() / dataset.trainSequences());
        o.addProperty("heldout_file", s.heldOut().getFileName().toString());
        o.addProperty("heldout_tokens", heldOutIds.length);
        o.addProperty("final_train_loss", meanOfLast(trainLoss, FINAL_LOSS_STEPS));
        o.addProperty("heldout_loss", last.loss());
        o.addProperty("heldout_perplexity", last.perplexity());
        o.addProperty("skipped_steps", skipped);
        o.addProperty("optimizer_state_bytes", state.optimizer());
        o.addProperty("state_bytes", state.total());
        o.addProperty("tokens_per_second", tokens / trainSeconds);
        o.addProperty("train_seconds", trainSeconds);
        JsonArray curve = new JsonArray();
        for (double l : trainLoss) {
            curve.add(l);
        }
        o.add("train_loss", curve);
        o.add("heldout", heldOutCurve);
        return o;
    }

    /** The mean of the last {@code n} values (all of them if fewer). */
    public static double meanOfLast(double[] values, int n) {
        int from = Math.max(0, values.length - n);
        double sum = 0;
        for (int i = from; i < values.length; i++) {
            sum += values[i];
        }
        return sum / (values.length - from);
    }

    private static PerplexityCommand.Evaluation evaluate(FineTuner tuner, long[] ids, int seq, JsonArray curve,
            PrintStream progress, String label) {
        PerplexityCommand.Evaluation e;
        try (PerplexityCommand.Scorer scorer = PerplexityCommand.scorerOf(tuner.model(), () -> { })) {
            e = PerplexityCommand.evaluate(scorer, ids, seq);
        }
        JsonArray point = new JsonArray();
        point.add(tuner.step());
        point.add(e.loss());
        curve.add(point);
        if (progress != null) {
            progress.printf(Locale.ROOT, "%s: step %d, held-out loss %.4f%n", label, tuner.step(), e.loss());
        }
        return e;
    }
}
