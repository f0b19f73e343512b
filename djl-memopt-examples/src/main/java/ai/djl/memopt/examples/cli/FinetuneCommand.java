package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.finetune.CheckpointChoice;
import ai.djl.memopt.finetune.CheckpointDirectory;
import ai.djl.memopt.finetune.DataParallelFineTuner;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.LearningRateSchedule;
import ai.djl.memopt.finetune.RunIdentity;
import ai.djl.memopt.finetune.StatefulOptimizer;
import ai.djl.memopt.finetune.TextCorpus;
import ai.djl.memopt.finetune.TokenDataset;
import ai.djl.memopt.gguf.GgufModelFiles;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.lora.LoraReport;
import ai.djl.memopt.model.deepseek.DeepSeekCheckpointWriter;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.CrashPoints;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.Callable;
import picocli.CommandLine.ArgGroup;
import picocli.CommandLine.Command;
import picocli.CommandLine.Model.CommandSpec;
import picocli.CommandLine.Option;
import picocli.CommandLine.Spec;

/**
 * {@code memopt finetune}: trains a DeepSeek model on plain text with activation checkpointing and/or FP16 mixed
 * precision, writing resumable training checkpoints and a Hugging Face model directory.
 *
 * <p>Layout of {@code --out DIR}: the final model ({@code config.json}, {@code model.safetensors} with FP32 weights,
 * {@code tokenizer.json} and {@code tokenizer_config.json} copied), and {@code DIR/checkpoints/step-NNNNNNNN/} training
 * checkpoints (every {@code --checkpoint-every} steps and at the end; this run's newest {@code --keep-checkpoints} are
 * kept, other runs' never deleted), each written whole or not at all, with the run's identity and checksums. The
 * directory is replaced as a whole when the run ends (its checkpoints carried over): a crash or an error leaves the old
 * one. {@code --resume} takes one checkpoint directory or a directory holding them (this run's newest is used; see
 * {@link CheckpointDirectory#find}); {@code --steps} is the total step count, so a resumed run continues to it, and a
 * checkpoint at {@code --steps} only writes the output. A loss that is not finite ends the run with an error naming
 * the step; numbers that are not finite are {@code null} in the JSON.
 *
 * <pre>
 * memopt finetune --model DIR --data speeches/ --steps 200 --batch 4 --seq 256 --checkpoint all --dtype fp16 \
 *     --lr 1e-4 --grad-accum 2 --out out/ --checkpoint-every 50
 * memopt finetune --model DIR --data speeches/ --steps 300 ... --out out/ --resume out/checkpoints
 * memopt finetune --model DIR --data speeches/ --steps 200 --lora-rank 8 --quantize int4 --checkpoint all \
 *     --out out/ --merge
 * </pre>
 *
 * <p>With {@code --lora-rank R} only LoRA adapters are trained (everything else frozen); {@code --quantize int8|int4}
 * first quantizes the frozen base (QLoRA). {@code --out DIR} then receives the adapter in Hugging Face PEFT's layout
 * ({@code adapter_model.safetensors}, {@code adapter_config.json}) instead of the model, and with {@code --merge} also
 * {@code DIR/merged/}: the base model (rebuilt from {@code --model} or the preset's seed, dequantized) with the adapter
 * folded in, a plain model directory.
 */
@Command(name = "finetune", mixinStandardHelpOptions = true,
        description = "Fine-tune a DeepSeek model on plain text (activation checkpointing, FP16, resumable).")
public final class FinetuneCommand implements Callable<Integer> {

    static final class Source {
        @Option(names = "--model", paramLabel = "DIR",
                description = "Model directory with tokenizer.json: a Hugging Face checkpoint, or a quantized artifact"
                        + " (then LoRA adapters train over its quantized layers: QLoRA; needs --lora-rank).")
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

    @Option(names = {"--dtype", "--precision"}, defaultValue = "fp32", paramLabel = "fp32|fp16",
            description = "fp16: the model in FP16 (norms and router FP32) with FP32 masters and dynamic loss scaling "
                    + "(default fp32).")
    String precision;

    @Option(names = "--optimizer", defaultValue = "adamw", paramLabel = "adamw|adamw8bit|adam|sgd",
            description = "Default adamw. adamw8bit keeps both Adam moments in 8 bits (block-wise, FP32 below a size"
                    + " threshold): 2 bytes of optimizer state per parameter instead of 8.")
    String optimizer;

    @Option(names = "--fused-update",
            description = "Update each checkpointed layer's weights as soon as its backward is done and free their"
                    + " gradients, so the full set of gradients never exists at once (needs --grad-accum 1; in FP16 a"
                    + " layer whose gradients overflow is back-propagated again at a lower scale before its update,"
                    + " so an overflow never leaves a partial update).")
    boolean fusedUpdate;

    @Option(names = "--offload-optimizer",
            description = "Keep the FP32 masters and optimizer state in host memory; the device keeps the working"
                    + " weights and gradients, and the update runs on the host.")
    boolean offloadOptimizer;

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

    @Option(names = {"--out", "--save"}, required = true, paramLabel = "DIR",
            description = "Output: the final model, and training checkpoints under DIR/checkpoints. Replaced as a whole"
                    + " when the run ends (checkpoints carried over).")
    Path save;

    @Option(names = "--checkpoint-every", defaultValue = "0", paramLabel = "N",
            description = "Write a training checkpoint every N steps (0: only at the end).")
    int checkpointEvery;

    @Option(names = "--keep-checkpoints", defaultValue = "2", paramLabel = "N",
            description = "This run's training checkpoints kept (newest; default 2); other runs' are never deleted.")
    int keepCheckpoints;

    @Option(names = "--resume", paramLabel = "DIR",
            description = "Continue from a training checkpoint, or this run's newest one in DIR (same settings and data;"
                    + " checksums verified).")
    Path resume;

    @Option(names = "--held-out", defaultValue = "0.05", paramLabel = "F",
            description = "Fraction of sequences held out for evaluation (default 0.05; 0 = none).")
    double heldOut;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "Device (default cpu).")
    String device;

    @Option(names = "--devices", paramLabel = "LIST",
            description = "Data parallel over these devices (e.g. gpu0,gpu1; cpu,cpu runs the replicas on the CPU):"
                    + " a replica on each, --batch rows split evenly between them, gradients summed, one update"
                    + " (optimizer state held once). Replaces --device.")
    String devices;

    @Spec CommandSpec spec;

    @Option(names = "--seed", defaultValue = "42", paramLabel = "S",
            description = "Seed of the data order (and of --preset weights; default 42).")
    long seed;

    @Option(names = {"--lora-rank", "--lora"}, defaultValue = "0", paramLabel = "R",
            description = "Train LoRA adapters of rank R instead of all weights (default 0: full fine-tuning).")
    int loraRank;

    @Option(names = "--lora-alpha", paramLabel = "A", description = "LoRA alpha (default 2 x rank).")
    Float loraAlpha;

    @Option(names = "--lora-targets", split = ",", paramLabel = "NAMES",
            defaultValue = "q_a_proj,q_b_proj,q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj",
            description = "Projections that get adapters, as PEFT's target_modules on transformers 5 (default: the "
                    + "attention ones). On a MoE model gate_proj,up_proj,down_proj mean every routed expert, not the "
                    + "dense MLP or the shared experts.")
    List<String> loraTargets;

    @Option(names = "--lora-target-parameters", split = ",", paramLabel = "NAMES",
            description = "Also adapt these parameters, as PEFT's target_parameters: mlp.gate_proj.weight (dense "
                    + "MLPs), shared_experts.up_proj.weight, gate_proj.weight (both), gate_up_proj (routed experts).")
    List<String> loraTargetParameters;

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
        FinetuneOptionChecks.validate(this);
        List<Device> devs = FinetuneOptionChecks.devices(this);
        Device dev = devs.get(0);
        FineTuner.Precision prec = FineTuner.Precision.parse(precision);
        StatefulOptimizer.Kind kind = StatefulOptimizer.Kind.parse(optimizer);
        FineTuner.checkpointPolicy(checkpoint); // validates the spec before any heavy work
        LoraConfig lora = loraConfig();
        Path tokenizerJson = source.model != null
                ? GgufModelFiles.directoryOf(source.model).resolve("tokenizer.json") : tokenizer;
        if (!Files.isRegularFile(tokenizerJson)) {
            throw new IllegalArgumentException(source.model != null
                    ? source.model + " has no tokenizer.json (needed to tokenize --data)"
                    : "tokenizer " + tokenizerJson + " does not exist");
        }
        AtomicFiles.recoverDirectory(save); // a save a crash interrupted: its old or its new version, complete
        FinetuneOptionChecks.checkSaveTarget(this);
        if (resume != null) {
            FineTuner.latestCheckpoint(resume); // says now, before any heavy work, if there is none
        }
        TokenDataset dataset = TokenDataset.tokenize(TextCorpus.read(data), tokenizerJson, seq, heldOut, seed);
        PrintStream err = System.err;
        err.printf(Locale.ROOT, "memopt finetune: %d tokens -> %d training + %d held-out sequences of %d%n",
                dataset.tokenCount(), dataset.trainSequences(), dataset.heldOutSequences(), seq);
        Map<String, String> identity = runIdentity(dataset);
        JsonObject[] done = new JsonObject[1];
        // --out is replaced as a whole once everything is written: a crash or an error before leaves the old one
        AtomicFiles.replaceDirectory(save, out -> {
            List<DeepSeekForCausalLM> models = new ArrayList<>();
            try {
                for (Device d : devs) {
                    models.add(loadBase(d));
                    prepare(models.get(models.size() - 1), dataset, lora, models.size() == 1);
                }
                LearningRateSchedule schedule = LearningRateSchedule.of(lr, warmup, cosine ? steps : 0, 0.1f);
                FineTuner.Builder settings = FineTuner.builder().optCheckpointing(checkpoint)
                        .optPrecision(prec).optOptimizer(kind).optSchedule(schedule).optWeightDecay(weightDecay)
                        .optFusedUpdate(fusedUpdate).optOffloadOptimizer(offloadOptimizer)
                        .optGradientAccumulation(gradAccum)
                        .optLossChunkTokens(Devices.lossChunkTokens(lossChunk, dev)).optSeed(seed)
                        .optRunIdentity(identity);
                if (models.size() == 1) {
                    try (FineTuner tuner = settings.setModel(models.get(0)).build()) {
                        resume(tuner);
                        done[0] = new FinetuneLoop(this, tuner::step).train(tuner, dataset, dev, tokenizerJson, out);
                    }
                } else {
                    try (DataParallelFineTuner dp = DataParallelFineTuner.create(settings, models)) {
                        resume(dp.primary());
                        dp.copyWeightsToReplicas(); // the restored weights, on every replica
                        done[0] = new FinetuneLoop(this, dp::step).train(dp.primary(), dataset, dev, tokenizerJson,
                                out);
                        done[0].add("devices", FinetuneLoop.names(devs));
                    }
                }
            } finally {
                models.forEach(DeepSeekForCausalLM::close);
            }
            if (merge) {
                writeMerged(dev, out);
                CrashPoints.reach("finetune-save.merged-written");
            }
            CheckpointDirectory.carryInto(save.resolve("checkpoints"), out.resolve("checkpoints"));
            CrashPoints.reach("finetune-save.checkpoints-carried");
        });
        new FinetuneLoop(this, null).report(done[0]);
        return 0;
    }

    /**
     * What makes this run the run it is, besides what the tuner knows itself: recorded in its checkpoints, which a
     * resume must match.
     */
    private Map<String, String> runIdentity(TokenDataset dataset) throws IOException {
        Map<String, String> id = new LinkedHashMap<>(dataset.identity());
        id.put("model", source.model != null ? RunIdentity.modelFingerprint(source.model)
                : "preset " + source.preset + " seed " + seed);
        id.put("batch", batch + " x " + gradAccum);
        id.put("lora", loraRank == 0 ? "none" : String.format(Locale.ROOT, "rank=%d alpha=%s dropout=%s targets=%s",
                loraRank, loraAlpha != null ? loraAlpha : 2f * loraRank, loraDropout, loraTargets));
        id.put("quantize_base", quantize == null ? "none" : quantize.toLowerCase(Locale.ROOT));
        return id;
    }

    /** Checks the model against the data and puts LoRA adapters (on a quantized base) on it when asked to. */
    private void prepare(DeepSeekForCausalLM lm, TokenDataset dataset, LoraConfig lora, boolean report) {
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
            LoraReport applied = Lora.apply(lm, lora);
            loraTrainable = applied.trainableParameters();
            if (report) { // once, not per data-parallel replica
                System.err.println("memopt finetune: " + applied + (quantize != null ? " on a " + quantize
                        + " base" : "") + ArtifactBase.describe(source.model));
            }
        }
    }

    /**
     * With {@code --resume}: restores this run's newest checkpoint (others are passed over, and said so). A checkpoint
     * at {@code --steps} (a run that a crash stopped while it saved) leaves nothing to train but the output to write.
     */
    private void resume(FineTuner tuner) throws IOException {
        PrintStream err = System.err;
        if (resume == null) {
            List<Path> others = CheckpointDirectory.otherRuns(save.resolve("checkpoints"), tuner.runIdentity());
            if (!others.isEmpty()) {
                err.printf(Locale.ROOT, "memopt finetune: %s holds %d checkpoint(s) of other runs (%s%s): they are"
                        + " kept, and neither resumed from nor pruned by this run%n", save.resolve("checkpoints"),
                        others.size(), others.get(0).getFileName(), others.size() > 1 ? ", ..." : "");
            }
            return;
        }
        CheckpointChoice from = CheckpointDirectory.find(resume, tuner.runIdentity());
        if (from.note() != null) {
            err.println("memopt finetune: " + from.note());
        }
        tuner.restoreCheckpoint(from.checkpoint());
        err.printf(Locale.ROOT, "memopt finetune: resumed from %s at step %d%n", from.checkpoint(), tuner.step());
        if (tuner.step() > steps) {
            throw new IllegalArgumentException("the checkpoint is at step " + tuner.step()
                    + ": --steps " + steps + " is the total step count and may not be below it");
        }
        if (tuner.step() == steps) {
            err.println("memopt finetune: the checkpoint is at --steps: nothing to train, writing the output");
        }
    }

    long loraTrainable = -1;

    private DeepSeekForCausalLM loadBase(Device dev) throws IOException {
        return source.model != null
                ? (ModelDirectories.isQuantizedArtifact(source.model)
                        ? ModelDirectories.loadDeepSeek(source.model, dev, DataType.FLOAT32) // QLoRA on an artifact
                        : ModelDirectories.loadFloat(source.model, dev, DataType.FLOAT32)) // HF directory or GGUF
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
                .optDropout(loraDropout).optTargetModules(loraTargets)
                .optTargetParameters(loraTargetParameters != null ? loraTargetParameters : List.of()).build();
    }

    /**
     * Rebuilds the FP32 base (the training model may be quantized or wrapped for FP16), puts the adapter saved in
     * {@code dir} on it, merges and writes a plain model directory to {@code dir/merged}. Merging onto the
     * full-precision base rather than the quantized one is what QLoRA users deploy (or quantize again).
     */
    private void writeMerged(Device dev, Path dir) throws IOException {
        Path out = dir.resolve("merged");
        try (DeepSeekForCausalLM lm = loadBase(dev)) {
            Lora.load(lm, dir);
            Lora.merge(lm);
            DeepSeekCheckpointWriter.save(lm, lm.config(), out);
        }
        Path tokenizerJson = source.model != null
                ? GgufModelFiles.directoryOf(source.model).resolve("tokenizer.json") : tokenizer;
        copyTokenizer(tokenizerJson, out);
    }

    static void copyTokenizer(Path tokenizerJson, Path dir) throws IOException {
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

}
