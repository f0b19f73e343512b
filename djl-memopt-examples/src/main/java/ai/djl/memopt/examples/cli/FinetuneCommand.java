package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingGradientCollector;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekCheckpointWriter;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.memopt.precision.MixedPrecisionOptimizer;
import ai.djl.memopt.precision.PrecisionPolicy;
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
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.Locale;
import java.util.Random;
import java.util.concurrent.Callable;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;

/**
 * {@code memopt finetune}: full fine-tuning of a DeepSeek model directory on token ids or a text file, with activation
 * checkpointing of the decoder layers and optional FP16 mixed precision, saved as a Hugging Face model directory.
 *
 * <p>Each step draws {@code --batch} random windows of {@code --seq} tokens (seeded) and minimises the mean
 * next-token cross-entropy with AdamW (or Adam/SGD); one JSON line per {@code --log-every} steps and a summary line
 * are printed. {@code --out} receives {@code config.json}, {@code model.safetensors} (FP32 weights: the masters under
 * FP16), the tokenizer files if the model had them, and {@code finetune.json} (options, losses, loss-scaler state).
 *
 * <pre>
 * memopt finetune --model DIR --text speech.txt --out tuned --steps 200 --seq 256 --batch 4 --lr 1e-4 \
 *     --checkpointing all --precision fp16
 * </pre>
 *
 * <p>FP16 keeps attention, the MoE blocks and the LM head in FP32: the model casts with DJL's {@code toType} there,
 * which is not differentiable in DJL 0.36, so in FP16 it would cut the gradient; the embedding, dense MLPs and the
 * code around the norms run in FP16.
 */
@Command(name = "finetune", mixinStandardHelpOptions = true,
        description = "Fine-tune a DeepSeek model with activation checkpointing and optional FP16 mixed precision.")
public final class FinetuneCommand implements Callable<Integer> {

    @Option(names = "--model", required = true, paramLabel = "DIR", description = "Hugging Face model directory.")
    Path model;

    @Option(names = "--text", paramLabel = "FILE", description = "UTF-8 training text, tokenized with DIR/tokenizer.json.")
    Path text;

    @Option(names = "--token-ids", paramLabel = "IDS", description = "Comma-separated training token ids.")
    String tokenIds;

    @Option(names = "--out", required = true, paramLabel = "DIR", description = "Output model directory.")
    Path out;

    @Option(names = "--steps", defaultValue = "100", paramLabel = "N", description = "Optimizer steps (default 100).")
    int steps;

    @Option(names = "--seq", defaultValue = "128", paramLabel = "N", description = "Tokens per window (default 128).")
    int seq;

    @Option(names = "--batch", defaultValue = "4", paramLabel = "N", description = "Windows per step (default 4).")
    int batch;

    @Option(names = "--lr", defaultValue = "1e-4", paramLabel = "F", description = "Learning rate (default 1e-4).")
    float lr;

    @Option(names = "--weight-decay", defaultValue = "0", paramLabel = "F",
            description = "AdamW/SGD weight decay (default 0).")
    float weightDecay;

    @Option(names = "--optimizer", defaultValue = "adamw", paramLabel = "adamw|adam|sgd",
            description = "Optimizer (default adamw).")
    String optimizer;

    @Option(names = "--checkpointing", defaultValue = "all", paramLabel = "none|all|every:N",
            description = "Activation checkpointing of the decoder layers (default all).")
    String checkpointing;

    @Option(names = "--precision", defaultValue = "fp32", paramLabel = "fp32|fp16",
            description = "fp32, or fp16 mixed precision with FP32 master weights and dynamic loss scaling.")
    String precision;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "Device (default cpu).")
    String device;

    @Option(names = "--seed", defaultValue = "0", paramLabel = "N", description = "Seed of the window sampling.")
    long seed;

    @Option(names = "--log-every", defaultValue = "10", paramLabel = "N", description = "Log interval in steps.")
    int logEvery;

    @Option(names = "--json", description = "Accepted for consistency: output is always JSON lines.")
    boolean json;

    @Override
    public Integer call() throws Exception {
        validate();
        DataType compute = Precisions.parse(precision);
        CheckpointPolicy policy = parsePolicy(checkpointing);
        Device dev = PerplexityCommand.parseDevice(device);
        if (!Files.isDirectory(model)) {
            throw new IllegalArgumentException("model directory " + model + " does not exist");
        }
        long[] ids = tokenIds != null ? PerplexityCommand.parseIds(tokenIds) : PerplexityCommand.tokenize(model, text);
        if (ids.length < seq) {
            throw new IllegalArgumentException(
                    "the training data has " + ids.length + " tokens, fewer than one window of --seq " + seq);
        }
        long startNanos = System.nanoTime();
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(model, dev, DataType.FLOAT32)) {
            for (long id : ids) {
                if (id < 0 || id >= lm.config().vocabSize()) {
                    throw new IllegalArgumentException("token id " + id + " is outside the model's vocabulary [0, "
                            + lm.config().vocabSize() + ")");
                }
            }
            int layers = 0;
            if (policy != null) {
                layers = Checkpointing.wrapChildren(Blocks.get(lm, "model.layers"), policy).size();
            }
            MixedPrecisionBlock mp = null;
            Block trained = lm;
            DynamicLossScaler scaler;
            if (compute == DataType.FLOAT16) {
                mp = MixedPrecisionBlock.wrap(lm, deepSeekFp16Policy());
                trained = mp;
                scaler = DynamicLossScaler.create();
            } else {
                // FP32 needs no scaling; the scaler still skips a step whose gradients hold inf/NaN
                scaler = DynamicLossScaler.builder().optInitialScale(1).optMinScale(1).optMaxScale(1).build();
            }
            MixedPrecisionOptimizer opt = MixedPrecisionOptimizer.builder().setBlock(trained)
                    .setOptimizer(buildOptimizer()).optLossScaler(scaler).build();

            Random random = new Random(seed);
            float firstLoss = Float.NaN;
            float lastLoss = Float.NaN;
            float[] losses = new float[steps];
            for (int step = 0; step < steps; step++) {
                long[] window = new long[batch * seq];
                for (int b = 0; b < batch; b++) {
                    int start = random.nextInt(ids.length - seq + 1);
                    System.arraycopy(ids, start, window, b * seq, seq);
                }
                float loss;
                try (NDManager m = lm.manager().newSubManager();
                        GradientCollector gc = policy != null
                                ? CheckpointingGradientCollector.open(m)
                                : m.getEngine().newGradientCollector()) {
                    NDArray input = m.create(window, new Shape(batch, seq)).toDevice(dev, false); // (B, T)
                    NDArray logits = trained.forward(new ParameterStore(m, false), new NDList(input), true).head();
                    NDArray l = CausalLmLoss.mean(logits, input);
                    loss = l.getFloat();
                    gc.backward(opt.scaleLoss(l));
                }
                boolean applied = opt.step();
                losses[step] = loss;
                if (step == 0) {
                    firstLoss = loss;
                }
                lastLoss = loss;
                if ((step + 1) % logEvery == 0 || step == steps - 1) {
                    JsonObject line = new JsonObject();
                    line.addProperty("step", step + 1);
                    line.addProperty("loss", loss);
                    line.addProperty("applied", applied);
                    line.addProperty("loss_scale", scaler.getScale());
                    line.addProperty("rss_mb", MemoryStats.residentBytes() / 1e6);
                    System.out.println(line);
                }
            }
            if (mp != null) {
                mp.withMasterWeights(() -> {
                    DeepSeekCheckpointWriter.save(lm, lm.config(), out);
                    return null;
                });
            } else {
                DeepSeekCheckpointWriter.save(lm, lm.config(), out);
            }
            for (String f : new String[] {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
                if (Files.isRegularFile(model.resolve(f))) {
                    copyAtomically(model.resolve(f), out.resolve(f));
                }
            }
            JsonObject summary = new JsonObject();
            summary.addProperty("model", model.toString());
            summary.addProperty("out", out.toString());
            summary.addProperty("steps", steps);
            summary.addProperty("tokens", ids.length);
            summary.addProperty("seq", seq);
            summary.addProperty("batch", batch);
            summary.addProperty("lr", lr);
            summary.addProperty("optimizer", optimizer.toLowerCase(Locale.ROOT));
            summary.addProperty("checkpointing", checkpointing);
            summary.addProperty("checkpointed_layers", layers);
            summary.addProperty("precision", precision.toLowerCase(Locale.ROOT));
            summary.addProperty("first_loss", firstLoss);
            summary.addProperty("last_loss", lastLoss);
            summary.addProperty("skipped_steps", scaler.getSkippedSteps());
            summary.addProperty("seconds", (System.nanoTime() - startNanos) / 1e9);
            summary.addProperty("peak_rss_mb", MemoryStats.peakResidentBytes() / 1e6);
            JsonObject state = new JsonObject();
            scaler.state().forEach(state::addProperty);
            JsonObject file = summary.deepCopy();
            file.add("loss_scaler", state);
            com.google.gson.JsonArray curve = new com.google.gson.JsonArray();
            for (float l : losses) {
                curve.add(l);
            }
            file.add("losses", curve);
            writeAtomically(out.resolve("finetune.json"), file.toString() + "\n");
            System.out.println(summary);
        }
        return 0;
    }

    private void validate() {
        if ((tokenIds == null) == (text == null)) {
            throw new IllegalArgumentException("give exactly one of --token-ids or --text");
        }
        if (steps < 1 || seq < 2 || batch < 1 || logEvery < 1) {
            throw new IllegalArgumentException(String.format(Locale.ROOT,
                    "need --steps >= 1, --seq >= 2, --batch >= 1, --log-every >= 1; got %d, %d, %d, %d", steps, seq,
                    batch, logEvery));
        }
        if (!(lr > 0) || !Float.isFinite(lr)) {
            throw new IllegalArgumentException("--lr must be positive, got " + lr);
        }
        if (!(weightDecay >= 0)) {
            throw new IllegalArgumentException("--weight-decay must be >= 0, got " + weightDecay);
        }
    }

    private Optimizer buildOptimizer() {
        switch (optimizer.toLowerCase(Locale.ROOT)) {
            case "adamw":
                return Optimizer.adamW().optLearningRateTracker(Tracker.fixed(lr)).optWeightDecays(weightDecay)
                        .build();
            case "adam":
                return Optimizer.adam().optLearningRateTracker(Tracker.fixed(lr)).build();
            case "sgd":
                return Optimizer.sgd().setLearningRateTracker(Tracker.fixed(lr)).optWeightDecays(weightDecay).build();
            default:
                throw new IllegalArgumentException("unknown --optimizer '" + optimizer + "': expected adamw, adam or sgd");
        }
    }

    /**
     * The FP16 policy for the DeepSeek model: the defaults (norms, router) plus attention, MoE blocks and the LM head in
     * FP32, because the model casts with DJL's non-differentiable {@code toType} inside them (see the class doc).
     */
    static PrecisionPolicy deepSeekFp16Policy() {
        return PrecisionPolicy.builder()
                .optKeepFp32((path, b) -> path.endsWith("self_attn") || path.equals("lm_head")
                        || b.getClass().getSimpleName().equals("DeepSeekMoE"))
                .build();
    }

    /** {@code none} -> null; {@code all}, {@code every:N}. */
    static CheckpointPolicy parsePolicy(String name) {
        String n = name.trim().toLowerCase(Locale.ROOT);
        if (n.equals("none")) {
            return null;
        }
        if (n.equals("all")) {
            return CheckpointPolicy.all();
        }
        if (n.startsWith("every:")) {
            try {
                return CheckpointPolicy.everyNth(Integer.parseInt(n.substring("every:".length())));
            } catch (NumberFormatException e) {
                throw new IllegalArgumentException("--checkpointing " + name + ": N must be an integer", e);
            }
        }
        throw new IllegalArgumentException("unknown --checkpointing '" + name + "': expected none, all or every:N"
                + " (runs of several layers as one segment, the sqrt(n) schedule, need a parent that feeds each layer"
                + " only the previous layer's output; the DeepSeek layers also take the rotary tables and the mask)");
    }

    private static void copyAtomically(Path from, Path to) throws java.io.IOException {
        Path tmp = Files.createTempFile(to.getParent(), "." + to.getFileName() + ".", ".tmp");
        try {
            Files.copy(from, tmp, StandardCopyOption.REPLACE_EXISTING);
            Files.move(tmp, to, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
        } finally {
            Files.deleteIfExists(tmp);
        }
    }

    private static void writeAtomically(Path to, String content) throws java.io.IOException {
        Path tmp = Files.createTempFile(to.getParent(), "." + to.getFileName() + ".", ".tmp");
        try {
            Files.writeString(tmp, content, StandardCharsets.UTF_8);
            Files.move(tmp, to, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
        } finally {
            Files.deleteIfExists(tmp);
        }
    }
}
