package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.LearningRateSchedule;
import ai.djl.memopt.finetune.StatefulOptimizer;
import ai.djl.memopt.finetune.StepResult;
import ai.djl.memopt.finetune.TextCorpus;
import ai.djl.memopt.finetune.TokenBatch;
import ai.djl.memopt.finetune.TokenDataset;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.lora.LoraReport;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.DeepSeekCheckpointWriter;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.Callable;
import java.util.stream.Collectors;
import java.util.stream.Stream;
import picocli.CommandLine.ArgGroup;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;

/**
 * {@code memopt finetune}: trains a DeepSeek model on plain text with activation checkpointing and/or FP16 mixed
 * precision, writing resumable training checkpoints and a Hugging Face model directory.
 *
 * <p>Layout of {@code --save DIR}: the final model ({@code config.json}, {@code model.safetensors} with FP32 weights,
 * {@code tokenizer.json} and {@code tokenizer_config.json} copied), and {@code DIR/checkpoints/step-NNNNNNNN/} training
 * checkpoints (every {@code --checkpoint-every} steps and at the end; the newest {@code --keep-checkpoints} are kept),
 * each written to a temporary directory and renamed into place. {@code --resume} takes one checkpoint directory or a
 * directory holding them (the newest is used); {@code --steps} is the total step count, so a resumed run continues to
 * it.
 *
 * <pre>
 * memopt finetune --model DIR --data speeches/ --steps 200 --batch 4 --seq 256 --checkpoint all --precision fp16 \
 *     --lr 1e-4 --grad-accum 2 --save out/ --checkpoint-every 50
 * memopt finetune --model DIR --data speeches/ --steps 300 ... --save out/ --resume out/checkpoints
 * memopt finetune --model DIR --data speeches/ --steps 200 --lora-rank 8 --quantize int4 --checkpoint all \
 *     --save out/ --merge
 * </pre>
 *
 * <p>With {@code --lora-rank R} only LoRA adapters are trained (everything else frozen); {@code --quantize int8|int4}
 * first quantizes the frozen base (QLoRA). {@code --save DIR} then receives the adapter in Hugging Face PEFT's layout
 * ({@code adapter_model.safetensors}, {@code adapter_config.json}) instead of the model, and with {@code --merge} also
 * {@code DIR/merged/}: the base model (rebuilt from {@code --model} or the preset's seed, dequantized) with the adapter
 * folded in, a plain model directory.
 */
@Command(name = "finetune", mixinStandardHelpOptions = true,
        description = "Fine-tune a DeepSeek model on plain text (activation checkpointing, FP16, resumable).")
public final class FinetuneCommand implements Callable<Integer> {

    static final class Source {
        @Option(names = "--model", paramLabel = "DIR",
                description = "Hugging Face model directory (config.json, safetensors, tokenizer.json).")
        Path model;

        @Option(names = "--preset", paramLabel = "NAME",
                description = "Random weights of a preset (bench-tiny, bench-small, deepseek-v2-lite); needs --tokenizer.")
        String preset;
    }

    @ArgGroup(exclusive = true, multiplicity = "1")
    Source source;

    @Option(names = "--tokenizer", paramLabel = "FILE",
            description = "tokenizer.json for --preset (its directory's tokenizer_config.json is used too).")
    Path tokenizer;

    @Option(names = "--data", required = true, paramLabel = "FILE_OR_DIR",
            description = "UTF-8 text file or directory of .txt files (sorted by name).")
    Path data;

    @Option(names = "--steps", required = true, paramLabel = "N", description = "Total optimizer steps.")
    int steps;

    @Option(names = "--batch", defaultValue = "4", paramLabel = "B",
            description = "Sequences per micro-batch (a step uses B x K sequences; default 4).")
    int batch;

    @Option(names = "--seq", defaultValue = "256", paramLabel = "T", description = "Tokens per sequence (default 256).")
    int seq;

    @Option(names = "--checkpoint", defaultValue = "none", paramLabel = "none|all|nested|nested+experts|every:N|sqrt",
            description = "Activation checkpointing of the decoder layers (default none). nested also checkpoints each"
                    + " layer's attention and MLP inside it, recomputed one at a time during the layer's backward (less"
                    + " memory, one more forward of each); nested+experts also each routed expert (the least memory,"
                    + " slow). sqrt checkpoints every ceil(sqrt(L))-th layer: DeepSeek layers are not a sequential"
                    + " chain, so Chen's multi-layer segments do not apply.")
    String checkpoint;

    @Option(names = "--precision", defaultValue = "fp32", paramLabel = "fp32|fp16",
            description = "fp16: the model in FP16 (norms and router FP32) with FP32 masters and dynamic loss scaling "
                    + "(default fp32).")
    String precision;

    @Option(names = "--optimizer", defaultValue = "adamw", paramLabel = "adamw|adam|sgd", description = "Default adamw.")
    String optimizer;

    @Option(names = "--lr", defaultValue = "1e-4", paramLabel = "X", description = "Peak learning rate (default 1e-4).")
    float lr;

    @Option(names = "--weight-decay", defaultValue = "0", paramLabel = "X", description = "Default 0.")
    float weightDecay;

    @Option(names = "--warmup", defaultValue = "0", paramLabel = "N", description = "Linear warmup steps (default 0).")
    int warmup;

    @Option(names = "--cosine", description = "Cosine decay of the learning rate to 10%% at --steps.")
    boolean cosine;

    @Option(names = "--grad-accum", defaultValue = "1", paramLabel = "K",
            description = "Micro-batches per optimizer step (default 1).")
    int gradAccum;

    @Option(names = "--loss-chunk", paramLabel = "TOKENS",
            description = "Compute the loss head in chunks of about this many tokens (default "
                    + Devices.CPU_LOSS_CHUNK_TOKENS + " on the CPU, " + Devices.GPU_LOSS_CHUNK_TOKENS + " on a GPU).")
    Integer lossChunk;

    @Option(names = "--save", required = true, paramLabel = "DIR",
            description = "Output: the final model, and training checkpoints under DIR/checkpoints.")
    Path save;

    @Option(names = "--checkpoint-every", defaultValue = "0", paramLabel = "N",
            description = "Write a training checkpoint every N steps (0: only at the end).")
    int checkpointEvery;

    @Option(names = "--keep-checkpoints", defaultValue = "2", paramLabel = "N",
            description = "Training checkpoints kept (newest; default 2).")
    int keepCheckpoints;

    @Option(names = "--resume", paramLabel = "DIR",
            description = "Continue from a training checkpoint (or the newest one in DIR).")
    Path resume;

    @Option(names = "--held-out", defaultValue = "0.05", paramLabel = "F",
            description = "Fraction of sequences held out for evaluation (default 0.05; 0 = none).")
    double heldOut;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "Device (default cpu).")
    String device;

    @Option(names = "--seed", defaultValue = "42", paramLabel = "S",
            description = "Seed of the data order (and of --preset weights; default 42).")
    long seed;

    @Option(names = {"--lora", "--lora-rank"}, defaultValue = "0", paramLabel = "R",
            description = "Train LoRA adapters of rank R instead of all weights (default 0: full fine-tuning).")
    int loraRank;

    @Option(names = "--lora-alpha", paramLabel = "A", description = "LoRA alpha (default 2 x rank).")
    Float loraAlpha;

    @Option(names = "--lora-targets", split = ",", paramLabel = "NAMES",
            defaultValue = "q_a_proj,q_b_proj,q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj",
            description = "Projections that get adapters, PEFT target_modules style (default: the attention ones).")
    List<String> loraTargets;

    @Option(names = "--lora-dropout", defaultValue = "0", paramLabel = "P", description = "LoRA dropout (default 0).")
    float loraDropout;

    @Option(names = {"--quantize-base", "--quantize"}, paramLabel = "int8|int4",
            description = "QLoRA: quantize the frozen base weights first (needs --lora-rank).")
    String quantize;

    @Option(names = "--merge", description = "With --lora-rank: also write the model with the adapter merged to DIR/merged.")
    boolean merge;

    @Option(names = "--json", description = "One JSON line per step and a final summary line on stdout.")
    boolean json;

    @Option(names = "--no-progress", description = "No progress bar on stderr.")
    boolean noProgress;

    @Override
    public Integer call() throws Exception {
        validate();
        Device dev = Devices.parse(device);
        FineTuner.Precision prec = FineTuner.Precision.parse(precision);
        StatefulOptimizer.Kind kind = StatefulOptimizer.Kind.parse(optimizer);
        FineTuner.checkpointPolicy(checkpoint); // validates the spec before any heavy work
        LoraConfig lora = loraConfig();
        Path tokenizerJson = source.model != null ? source.model.resolve("tokenizer.json") : tokenizer;
        if (!Files.isRegularFile(tokenizerJson)) {
            throw new IllegalArgumentException(source.model != null
                    ? source.model + " has no tokenizer.json (needed to tokenize --data)"
                    : "tokenizer " + tokenizerJson + " does not exist");
        }
        Path resumeFrom = resume != null ? FineTuner.latestCheckpoint(resume) : null;
        TokenDataset dataset = TokenDataset.tokenize(TextCorpus.read(data), tokenizerJson, seq, heldOut, seed);
        PrintStream err = System.err;
        err.printf(Locale.ROOT, "memopt finetune: %d tokens -> %d training + %d held-out sequences of %d%n",
                dataset.tokenCount(), dataset.trainSequences(), dataset.heldOutSequences(), seq);
        int code;
        try (DeepSeekForCausalLM lm = loadBase(dev)) {
            if (dataset.maxTokenId() >= lm.config().vocabSize()) {
                throw new IllegalArgumentException("the tokenizer produces id " + dataset.maxTokenId()
                        + " but the model's vocabulary has " + lm.config().vocabSize() + " entries");
            }
            if (seq > lm.config().maxPositionEmbeddings()) {
                throw new IllegalArgumentException("--seq " + seq + " exceeds the model's max_position_embeddings "
                        + lm.config().maxPositionEmbeddings());
            }
            if (lora != null) {
                if (quantize != null) {
                    Quantizer.quantize(lm, quantize.equalsIgnoreCase("int8") ? Int8WeightOnlyConfig.builder().build()
                            : Int4WeightOnlyConfig.builder().build());
                }
                LoraReport report = Lora.apply(lm, lora);
                loraTrainable = report.trainableParameters();
                err.println("memopt finetune: " + report + (quantize != null ? " on a " + quantize + " base" : ""));
            }
            LearningRateSchedule schedule = LearningRateSchedule.of(lr, warmup, cosine ? steps : 0, 0.1f);
            try (FineTuner tuner = FineTuner.builder().setModel(lm).optCheckpointing(checkpoint).optPrecision(prec)
                    .optOptimizer(kind).optSchedule(schedule).optWeightDecay(weightDecay)
                    .optGradientAccumulation(gradAccum).optLossChunkTokens(Devices.lossChunkTokens(lossChunk, dev))
                    .optSeed(seed).build()) {
                if (resumeFrom != null) {
                    tuner.restoreCheckpoint(resumeFrom);
                    err.printf(Locale.ROOT, "memopt finetune: resumed from %s at step %d%n", resumeFrom, tuner.step());
                    if (tuner.step() >= steps) {
                        throw new IllegalArgumentException("the checkpoint is at step " + tuner.step()
                                + ": --steps " + steps + " is the total step count and must exceed it");
                    }
                }
                code = train(tuner, dataset, dev, tokenizerJson);
            }
        }
        if (code == 0 && merge) {
            writeMerged(dev);
        }
        return code;
    }

    private long loraTrainable = -1;

    private DeepSeekForCausalLM loadBase(Device dev) throws IOException {
        return source.model != null
                ? DeepSeekLoader.load(source.model, dev, DataType.FLOAT32)
                : DeepSeekForCausalLM.random(DeepSeekConfig.preset(source.preset), seed, dev, DataType.FLOAT32);
    }

    /** The LoRA configuration of the options, or null for full fine-tuning. */
    private LoraConfig loraConfig() {
        if (loraRank == 0) {
            if (quantize != null || merge) {
                throw new IllegalArgumentException((quantize != null ? "--quantize-base" : "--merge")
                        + " is for LoRA fine-tuning: give --lora RANK");
            }
            return null;
        }
        if (loraRank < 0) {
            throw new IllegalArgumentException("--lora-rank must be positive, got " + loraRank);
        }
        if (quantize != null && !quantize.equalsIgnoreCase("int8") && !quantize.equalsIgnoreCase("int4")) {
            throw new IllegalArgumentException("unknown --quantize '" + quantize + "': expected int8 or int4");
        }
        return LoraConfig.builder().setRank(loraRank).optAlpha(loraAlpha != null ? loraAlpha : 2f * loraRank)
                .optDropout(loraDropout).optTargetModules(loraTargets).build();
    }

    /**
     * Rebuilds the FP32 base (the training model may be quantized or wrapped for FP16), puts the saved adapter on it,
     * merges and writes a plain model directory to {@code DIR/merged}. Merging onto the full-precision base rather
     * than the quantized one is what QLoRA users deploy (or quantize again).
     */
    private void writeMerged(Device dev) throws IOException {
        Path out = save.resolve("merged");
        try (DeepSeekForCausalLM lm = loadBase(dev)) {
            Lora.load(lm, save);
            Lora.merge(lm);
            DeepSeekCheckpointWriter.save(lm, lm.config(), out);
        }
        Path tokenizerJson = source.model != null ? source.model.resolve("tokenizer.json") : tokenizer;
        copyTokenizer(tokenizerJson, out);
        System.err.println("memopt finetune: merged model written to " + out);
    }

    private void validate() {
        if (source.preset != null && tokenizer == null) {
            throw new IllegalArgumentException("--preset needs --tokenizer FILE (a tokenizer.json)");
        }
        if (source.model != null && tokenizer != null) {
            throw new IllegalArgumentException("--tokenizer is for --preset; --model uses DIR/tokenizer.json");
        }
        if (source.model != null && !Files.isDirectory(source.model)) {
            throw new IllegalArgumentException("model directory " + source.model + " does not exist");
        }
        positive("--steps", steps);
        positive("--batch", batch);
        positive("--grad-accum", gradAccum);
        positive("--keep-checkpoints", keepCheckpoints);
        if (lossChunk != null) {
            positive("--loss-chunk", lossChunk);
        }
        if (seq < 2) {
            throw new IllegalArgumentException("--seq must be at least 2, got " + seq);
        }
        if (checkpointEvery < 0) {
            throw new IllegalArgumentException("--checkpoint-every must be >= 0, got " + checkpointEvery);
        }
        if (!(lr > 0) || !Float.isFinite(lr)) {
            throw new IllegalArgumentException("--lr must be a positive number, got " + lr);
        }
        if (warmup < 0 || (cosine && warmup >= steps)) {
            throw new IllegalArgumentException("--warmup must be >= 0 (and below --steps with --cosine), got " + warmup);
        }
    }

    private static void positive(String name, int value) {
        if (value < 1) {
            throw new IllegalArgumentException(name + " must be at least 1, got " + value);
        }
    }

    private int train(FineTuner tuner, TokenDataset dataset, Device dev, Path tokenizerJson) throws IOException {
        PrintStream out = System.out;
        Path checkpoints = save.resolve("checkpoints");
        int rows = batch * gradAccum;
        Double heldOutBefore = tuner.step() == 0 ? heldOutLoss(tuner, dataset) : null;
        ProgressBar bar = noProgress ? null : new ProgressBar(System.err, "train", steps);
        long start = System.nanoTime();
        long tokens = 0;
        long startStep = tuner.step();
        StepResult last = null;
        double firstLoss = Double.NaN;
        long skipped = 0;
        while (tuner.step() < steps) {
            TokenBatch b = dataset.trainBatch(tuner.dataPosition(), rows);
            long t0 = System.nanoTime();
            last = tuner.step(b);
            double seconds = (System.nanoTime() - t0) / 1e9;
            tokens += last.tokens();
            skipped += last.skipped() ? 1 : 0;
            if (Double.isNaN(firstLoss)) {
                firstLoss = last.loss();
            }
            long memory = MemoryStats.deviceBytesInUse(dev);
            if (json) {
                JsonObject o = new JsonObject();
                o.addProperty("event", "step");
                o.addProperty("step", last.step());
                o.addProperty("loss", last.loss());
                o.addProperty("lr", last.learningRate());
                o.addProperty("loss_scale", last.lossScale());
                o.addProperty("skipped", last.skipped());
                o.addProperty("tokens", last.tokens());
                o.addProperty("step_seconds", seconds);
                o.addProperty("memory_bytes", memory);
                out.println(o);
            }
            if (bar != null) {
                bar.update(last.step(), stepStatus(last, last.tokens() / seconds, memory));
            }
            if (checkpointEvery > 0 && tuner.step() % checkpointEvery == 0 && tuner.step() < steps) {
                writeCheckpoint(tuner, checkpoints);
            }
        }
        if (bar != null) {
            bar.finish();
        }
        double elapsed = (System.nanoTime() - start) / 1e9;
        writeCheckpoint(tuner, checkpoints);
        if (loraTrainable >= 0) {
            Lora.save(tuner.model(), save, source.model != null ? source.model.toString() : source.preset);
        } else {
            tuner.saveModel(save);
        }
        copyTokenizer(tokenizerJson, save);
        Double heldOutAfter = heldOutLoss(tuner, dataset);
        JsonObject o = new JsonObject();
        o.addProperty("event", "done");
        o.addProperty("steps", tuner.step());
        o.addProperty("steps_run", tuner.step() - startStep);
        o.addProperty("first_loss", firstLoss);
        o.addProperty("last_loss", last.loss());
        if (heldOutBefore != null) {
            o.addProperty("held_out_loss_before", heldOutBefore);
        }
        if (heldOutAfter != null) {
            o.addProperty("held_out_loss", heldOutAfter);
        }
        o.addProperty("held_out_sequences", dataset.heldOutSequences());
        o.addProperty("skipped_steps", skipped);
        o.addProperty("loss_scale", tuner.lossScale());
        o.addProperty("tokens_per_second", tokens / elapsed);
        o.addProperty("peak_memory_bytes", dev.isGpu() ? MemoryStats.deviceBytesInUse(dev)
                : MemoryStats.peakResidentBytes());
        o.addProperty("precision", tuner.precision().name().toLowerCase(Locale.ROOT));
        o.addProperty("checkpointing", tuner.checkpointing());
        if (loraTrainable >= 0) {
            o.addProperty("lora_rank", loraRank);
            o.addProperty("lora_trainable_parameters", loraTrainable);
            o.addProperty("quantized_base", quantize != null ? quantize.toLowerCase(Locale.ROOT) : "none");
        }
        o.addProperty("save", save.toString());
        if (json) {
            out.println(o);
        } else {
            out.printf(Locale.ROOT, "trained to step %d: loss %.4f -> %.4f%s; %s saved to %s%n", tuner.step(),
                    firstLoss, last.loss(), heldOutAfter != null
                            ? String.format(Locale.ROOT, ", held-out loss %.4f", heldOutAfter) : "",
                    loraTrainable >= 0 ? "LoRA adapter" : "model", save);
        }
        return 0;
    }

    /** Mean loss over the held-out sequences (in micro-batches of --batch), or null without a held-out split. */
    private Double heldOutLoss(FineTuner tuner, TokenDataset dataset) {
        int n = dataset.heldOutSequences();
        if (n == 0) {
            return null;
        }
        double sum = 0;
        for (int from = 0; from < n; from += batch) {
            int to = Math.min(n, from + batch);
            sum += tuner.evaluate(dataset.heldOutBatch(from, to)) * (to - from);
        }
        return sum / n;
    }

    private void writeCheckpoint(FineTuner tuner, Path checkpoints) throws IOException {
        Path dir = checkpoints.resolve(String.format(Locale.ROOT, "step-%08d", tuner.step()));
        tuner.saveCheckpoint(dir);
        List<Path> all;
        try (Stream<Path> s = Files.list(checkpoints)) {
            all = s.filter(p -> p.getFileName().toString().startsWith("step-") && FineTuner.isCheckpoint(p))
                    .sorted(Comparator.comparing(p -> p.getFileName().toString()))
                    .collect(Collectors.toCollection(ArrayList::new));
        }
        while (all.size() > keepCheckpoints) {
            Path old = all.remove(0);
            try (Stream<Path> w = Files.walk(old)) {
                for (Path p : (Iterable<Path>) w.sorted(Comparator.reverseOrder())::iterator) {
                    Files.deleteIfExists(p);
                }
            }
        }
    }

    private static void copyTokenizer(Path tokenizerJson, Path dir) throws IOException {
        Path from = tokenizerJson.toAbsolutePath().getParent();
        for (String name : new String[] {"tokenizer.json", "tokenizer_config.json"}) {
            Path src = name.equals("tokenizer.json") ? tokenizerJson : from.resolve(name);
            Path dst = dir.resolve(name);
            if (!Files.isRegularFile(src) || src.toAbsolutePath().equals(dst.toAbsolutePath())) {
                continue;
            }
            AtomicFiles.copy(src, dst);
        }
    }

    private static String stepStatus(StepResult r, double tokensPerSecond, long memory) {
        float scale = r.lossScale();
        return String.format(Locale.ROOT, "loss %.4f  %.0f tok/s  scale %s  mem %.1f MB%s", r.loss(), tokensPerSecond,
                scale == Math.rint(scale) ? Long.toString((long) scale) : Float.toString(scale), memory / 1e6,
                r.skipped() ? " (skipped)" : "");
    }
}
