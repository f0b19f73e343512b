package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.examples.bench.FreshJvm;
import ai.djl.memopt.examples.demo.ByteLevelBpeTrainer;
import ai.djl.memopt.examples.demo.CpuProfile;
import ai.djl.memopt.examples.demo.DemoReport;
import ai.djl.memopt.examples.demo.DemoTraining;
import ai.djl.memopt.examples.demo.DemoVariantWorker;
import ai.djl.memopt.examples.demo.Fp16Probe;
import ai.djl.memopt.examples.demo.TrainingPlan;
import ai.djl.memopt.examples.demo.VariantResult;
import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.TextCorpus;
import ai.djl.memopt.finetune.TokenDataset;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.Callable;
import picocli.CommandLine.Command;
import picocli.CommandLine.Mixin;
import picocli.CommandLine.Option;

/**
 * {@code memopt demo}: the tour. Builds a small DeepSeek-V3-style model, trains a byte-level BPE tokenizer and
 * fine-tunes the model on State of the Union addresses shipped with the tool (public domain) with activation
 * checkpointing and FP16 mixed precision, quantizes it to int8 and int4, exports the artifacts, loads each variant
 * back in a fresh JVM, generates a sample from each, and ends with one table: peak memory, weight bytes, held-out
 * perplexity and tokens per second, every figure measured in this run.
 *
 * <p>How it trains depends on what the machine computes fast ({@link TrainingPlan}): on a GPU, or a CPU with FP16
 * arithmetic, every step runs in FP16 with FP32 masters; on a CPU without it (FP16 measured 4x slower than FP32 on an
 * AVX2 AMD EPYC), the steps run in FP32 and FP16 mixed precision is shown on a short run from the same start, its losses
 * compared with FP32's. The first line it prints says which, and why.
 *
 * <p>With {@code --out DIR} it keeps {@code DIR/model} (Hugging Face layout with its tokenizer), {@code DIR/int8},
 * {@code DIR/int4} (quantized artifacts) and {@code DIR/report.html}; {@code memopt perplexity} and
 * {@code memopt generate} run on each of them.
 */
@Command(name = "demo", mixinStandardHelpOptions = true,
        description = "Fine-tune a small DeepSeek-style model with activation checkpointing and FP16 mixed precision"
                + " (FP32 beside a short FP16 run where this CPU has no fast FP16), quantize it to int8/int4, export,"
                + " reload, generate, and compare every variant in one table.")
public final class DemoCommand implements Callable<Integer> {

    /** The shipped corpus: the last address is held out for perplexity. */
    static final List<String> CORPUS = List.of(
            "1961_john_f_kennedy_d.txt", "1962_john_f_kennedy_d.txt", "1963_john_f_kennedy_d.txt",
            "1964_lyndon_b_johnson_d.txt", "1965_lyndon_b_johnson_d.txt", "1966_lyndon_b_johnson_d.txt",
            "1967_lyndon_b_johnson_d.txt", "1968_lyndon_b_johnson_d.txt", "1969_lyndon_b_johnson_d.txt",
            "1970_richard_nixon_r.txt", "1971_richard_nixon_r.txt", "1972_richard_nixon_r.txt");
    static final String PROMPT = "The state of the Union";

    @Option(names = "--out", paramLabel = "DIR",
            description = "Keep what the demo makes here (model, int8, int4, report.html); default: a temporary "
                    + "directory that is deleted at the end.")
    Path out;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "Device (default cpu).")
    String device;

    @Option(names = "--dtype", defaultValue = "auto", paramLabel = "auto|fp32|fp16",
            description = "Training precision. auto (default): FP16 with FP32 master weights where FP16 is fast (a GPU,"
                    + " or a CPU with FP16 arithmetic, measured with a 0.1 s matrix-product probe); else FP32, with"
                    + " FP16 mixed precision shown on a short run beside it.")
    String dtype;

    @Option(names = "--steps", paramLabel = "N",
            description = "Training steps (default: " + TrainingPlan.FP16_STEPS + " in FP16, " + TrainingPlan.FP32_STEPS
                    + " in FP32).")
    Integer steps;

    @Mixin DemoModelOptions demoModel = new DemoModelOptions();

    @Option(names = {"--max-new-tokens", "--new-tokens"}, defaultValue = "48", paramLabel = "N",
            description = "Tokens generated per variant for the sample and tokens/s (default 48).")
    int newTokens;

    @Option(names = "--seed", defaultValue = "7", paramLabel = "S", description = "Seed (default 7).")
    long seed;

    @Option(names = "--worker-heap", defaultValue = "512m", paramLabel = "SIZE",
            description = "-Xmx of each variant's measuring JVM (default 512m; the weights live outside the Java heap).")
    String workerHeap;

    @Option(names = "--no-progress", description = "No progress bars on stderr.")
    boolean noProgress;

    @Option(names = "--json", description = "Print JSON lines (the training, then one per variant) instead of the"
            + " table.")
    boolean json;

    @Override
    public Integer call() throws Exception {
        if ((steps != null && steps < 1) || newTokens < 1) {
            throw new IllegalArgumentException("need --steps >= 1, --max-new-tokens >= 1");
        }
        demoModel.validate();
        int batch = demoModel.batch;
        int seq = demoModel.seq;
        int vocab = demoModel.vocab;
        int hidden = demoModel.hidden;
        int layers = demoModel.layers;
        if (!workerHeap.matches("[1-9][0-9]*[kKmMgG]?")) {
            throw new IllegalArgumentException("--worker-heap: expected a JVM heap size such as 512m or 2g, got '"
                    + workerHeap + "'");
        }
        if (!List.of("auto", "fp32", "fp16", "float32", "float16").contains(dtype.trim().toLowerCase(Locale.ROOT))) {
            throw new IllegalArgumentException("--dtype must be auto, fp32 or fp16, got '" + dtype + "'");
        }
        // a model this small runs fastest on one PyTorch thread; more threads spin on a busy machine (measured 12x
        // slower generation with 2 threads on 2 shared cores). An explicit -Dai.djl.pytorch.num_threads wins.
        if (System.getProperty("ai.djl.pytorch.num_threads") == null) {
            System.setProperty("ai.djl.pytorch.num_threads", "1");
            System.setProperty("ai.djl.pytorch.num_interop_threads", "1");
        }
        Device dev = Devices.parse(device);
        boolean keep = out != null;
        Path work = keep ? Files.createDirectories(out) : Files.createTempDirectory("memopt-demo");
        PrintStream err = System.err;
        try {
            long start = System.nanoTime();
            startNanos = start;
            CpuProfile cpu = CpuProfile.current();
            TrainingPlan plan = TrainingPlan.choose(dtype, steps, dev.isGpu(), cpu,
                    () -> Fp16Probe.measure(PROBE_MILLIS));
            say(err, "%s", plan.reason());
            Path train = Files.createDirectories(work.resolve("data/train"));
            Path heldOut = work.resolve("data/heldout.txt");
            List<String> texts = extractCorpus(train, heldOut);

            say(err, "1/5 tokenizer: byte-level BPE with %d tokens trained on %d addresses", vocab, texts.size());
            Path model = Files.createDirectories(work.resolve("model"));
            ByteLevelBpeTrainer.train(texts, vocab).writeTo(model);

            DeepSeekConfig config = demoModel.config();
            say(err, "2/5 fine-tune: DeepSeek-V3-style model, %,d parameters, %d steps of %dx%d tokens, "
                    + "activation checkpointing on every decoder layer, %s", config.parameterCount(), plan.steps(),
                    batch, seq, plan.precision() == FineTuner.Precision.FP16
                            ? "FP16 compute with FP32 master weights" : "FP32 (then an FP16 mixed-precision run of "
                                    + plan.fp16Steps() + " steps)");
            TokenDataset dataset = TokenDataset.tokenize(TextCorpus.read(train), model.resolve("tokenizer.json"), seq,
                    0.0, seed);
            DemoTraining.Result trained = new DemoTraining(config, dev, dataset, batch, demoModel.lr, seed,
                    noProgress ? null : err).run(plan, model);
            if (trained.showcase() != null) {
                err.println("      " + trained.showcase());
            }

            say(err, "3/5 quantize: int8 (per channel) and int4 (group-wise), exported as artifacts");
            quantize(model, work.resolve("int8"), Int8WeightOnlyConfig.builder().build(), dev);
            quantize(model, work.resolve("int4"), Int4WeightOnlyConfig.builder().optGroupSize(128).build(), dev);

            say(err, "4/5 evaluate: each variant loaded in a fresh JVM: held-out perplexity (%s), a %d-token sample",
                    CORPUS.get(CORPUS.size() - 1).replace(".txt", ""), newTokens);
            List<VariantResult> variants = evaluate(dev, heldOut, List.of(
                    new String[] {"fp32", "model", "float32"}, new String[] {"fp16", "model", "float16"},
                    new String[] {"int8", "int8", "float32"}, new String[] {"int4", "int4", "float32"}), work);

            double minutes = (System.nanoTime() - start) / 60e9;
            String machine = dev.isGpu() ? "gpu" : "cpu: " + cpu.describe();
            String settings = String.format(Locale.ROOT, "DeepSeek-V3-style model (%,d parameters, %d layers, "
                    + "hidden %d, %d routed experts), BPE vocabulary %d, %d steps of %dx%d tokens in %s with "
                    + "activation checkpointing%s, on %s; %.1f minutes in all", config.parameterCount(), layers,
                    hidden, config.nRoutedExperts(), vocab, plan.steps(), batch, seq,
                    plan.precision() == FineTuner.Precision.FP16 ? "FP16 (FP32 masters)" : "FP32",
                    plan.fp16Steps() > 0 ? " (and " + plan.fp16Steps() + " in FP16 beside them)" : "", machine,
                    minutes);
            DemoReport report = new DemoReport(variants, trained.lossCurve(), settings);
            say(err, "5/5 report");
            if (json) {
                System.out.println(trainingJson(cpu, plan, trained, minutes));
                for (VariantResult v : variants) {
                    System.out.println(v.toJson());
                }
            } else {
                System.out.println();
                System.out.println(settings);
                System.out.println();
                System.out.print(report.table());
                System.out.println(DemoReport.PEAK_MEMORY_NOTE);
                System.out.println();
                for (VariantResult v : variants) {
                    System.out.printf(Locale.ROOT, "%-5s %s%n", v.name() + ":", v.sample().replace('\n', ' '));
                }
            }
            if (keep) {
                report.writeHtml(work.resolve("report.html"));
                // stdout carries only JSON lines with --json
                PrintStream note = json ? err : System.out;
                note.println();
                note.println("kept in " + work.toAbsolutePath() + ": model/, int8/, int4/, report.html; try");
                note.println("  " + MemoptCli.invocation() + " generate --model " + work.resolve("int4")
                        + " --prompt \"" + PROMPT + "\" --max-new-tokens 40");
            }
            return 0;
        } finally {
            if (!keep) {
                deleteRecursively(work);
            }
        }
    }

    /** How long the FP16 probe measures. */
    static final long PROBE_MILLIS = 100;

    private static JsonObject trainingJson(CpuProfile cpu, TrainingPlan plan, DemoTraining.Result trained,
            double minutes) {
        JsonObject o = new JsonObject();
        o.addProperty("event", "training");
        o.addProperty("cpu", cpu.describe());
        o.addProperty("precision", plan.precision().name().toLowerCase(Locale.ROOT));
        o.addProperty("steps", plan.steps());
        o.addProperty("fp16_steps", plan.fp16Steps());
        o.addProperty("reason", plan.reason());
        o.addProperty("tokens_per_second", trained.tokensPerSecond());
        o.addProperty("final_loss", trained.lossCurve().get(trained.lossCurve().size() - 1)[1]);
        DemoTraining.Showcase sc = trained.showcase();
        if (sc != null) {
            o.addProperty("fp16_max_relative_loss_difference", sc.maxRelativeLossDifference());
            o.addProperty("fp16_tokens_per_second", sc.fp16TokensPerSecond());
            o.addProperty("fp32_tokens_per_second_same_steps", sc.fp32TokensPerSecond());
            o.addProperty("fp16_skipped_steps", sc.skippedSteps());
        }
        o.addProperty("minutes", minutes);
        return o;
    }

    /** The demo model: DeepSeek-V3's architecture (MLA, shared + routed experts, sigmoid router) at toy width. */
    public static DeepSeekConfig demoConfig(int vocab, int hidden, int layers, int seq) {
        int heads = 4;
        return DeepSeekConfig.builder(DeepSeekConfig.DEEPSEEK_V3)
                .vocabSize(vocab).hiddenSize(hidden).intermediateSize(3 * hidden).moeIntermediateSize(hidden)
                .numHiddenLayers(layers).numAttentionHeads(heads).qLoraRank(hidden / 2).kvLoraRank(hidden / 2)
                .qkNopeHeadDim(hidden / heads).qkRopeHeadDim(hidden / (2 * heads)).vHeadDim(hidden / heads)
                .nRoutedExperts(8).nSharedExperts(1).numExpertsPerTok(2).nGroup(2).topkGroup(1)
                .routedScalingFactor(2.5).normTopkProb(true).firstKDenseReplace(1)
                .maxPositionEmbeddings(Math.max(512, seq)).tieWordEmbeddings(false).build();
    }

    private void quantize(Path model, Path artifact, QuantizationConfig config, Device dev) throws IOException {
        try (NDManager weights = NDManager.newBaseManager(dev)) {
            DeepSeekForCausalLM lm = ModelDirectories.loadDeepSeek(model, weights, DataType.FLOAT32);
            QuantizationReport report = Quantizer.quantize(lm, config);
            QuantizedArtifact.export(lm, artifact, ExportOptions.builder().optSourceModel(model)
                    .optReportsJson(report.toJson().toString()).build());
            System.err.printf(Locale.ROOT, "      %s: %d layers, %s -> %s in quantized layers, min SQNR %.1f dB, "
                    + "%d kept in full precision%n", artifact.getFileName(), report.layers().size(),
                    human(report.bytesBefore()), human(report.bytesAfter()), report.minSqnrDb(),
                    report.skipped().size());
        }
    }

    private List<VariantResult> evaluate(Device dev, Path heldOut, List<String[]> variants, Path work)
            throws IOException {
        List<VariantResult> results = new ArrayList<>();
        ProgressBar bar = noProgress ? null : new ProgressBar(System.err, "evaluate", variants.size());
        int done = 0;
        for (String[] v : variants) {
            if (bar != null) {
                bar.update(done, v[0] + " ...");
            }
            // A small, lazily grown heap (serial GC, 16 MB to start) and a fixed glibc mmap threshold make the worker's
            // peak resident set follow the native memory the variant needs. Measured on the default demo model: with
            // -Xmx2g and G1, fp32 / fp16 / int4 peaked at 288 / 345 / 410 MiB (the Java garbage of reading an artifact
            // grew the heap); with these settings at 251 / 302 / 276 MiB.
            List<String> lines = FreshJvm.run(List.of("-Xms16m", "-Xmx" + workerHeap, "-XX:+UseSerialGC"),
                    BenchTrainCommand.ALLOCATOR, 1800, DemoVariantWorker.class, List.of(
                    work.resolve(v[1]).toString(), v[2], dev.isGpu() ? "gpu" : "cpu", heldOut.toString(),
                    Integer.toString(demoModel.seq), Integer.toString(newTokens), PROMPT));
            results.add(VariantResult.fromWorker(v[0], BenchGenerateCommand.lastJson(lines, v[0])));
            done++;
        }
        if (bar != null) {
            bar.update(done, "");
            bar.finish();
        }
        return results;
    }

    /** Copies the shipped corpus out of the jar: all addresses but the last for training, the last held out. */
    static List<String> extractCorpus(Path trainDir, Path heldOut) throws IOException {
        List<String> texts = new ArrayList<>();
        for (int i = 0; i < CORPUS.size(); i++) {
            String name = CORPUS.get(i);
            try (InputStream in = DemoCommand.class.getResourceAsStream("/ai/djl/memopt/examples/demo/sotu/" + name)) {
                if (in == null) {
                    throw new IOException("demo corpus file " + name + " is missing from the tool's jar");
                }
                String text = new String(in.readAllBytes(), StandardCharsets.UTF_8);
                boolean last = i == CORPUS.size() - 1;
                Files.writeString(last ? heldOut : trainDir.resolve(name), text, StandardCharsets.UTF_8);
                if (!last) {
                    texts.add(text);
                }
            }
        }
        return texts;
    }

    /** When the tour started, for the elapsed time each stage line shows. */
    private long startNanos = System.nanoTime();

    private void say(PrintStream err, String format, Object... args) {
        err.println("memopt demo: [" + ProgressBar.clock(System.nanoTime() - startNanos) + "] "
                + String.format(Locale.ROOT, format, args));
    }

    private static String human(long bytes) {
        return bytes >= 1 << 20 ? String.format(Locale.ROOT, "%.1f MiB", bytes / 1048576.0)
                : String.format(Locale.ROOT, "%.1f KiB", bytes / 1024.0);
    }

    private static void deleteRecursively(Path dir) {
        try {
            AtomicFiles.deleteTree(dir);
        } catch (IOException e) {
            System.err.println("memopt demo: could not delete " + dir + ": " + e.getMessage());
        }
    }
}
