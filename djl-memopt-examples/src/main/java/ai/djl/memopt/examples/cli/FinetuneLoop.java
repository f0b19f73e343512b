package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.finetune.CheckpointDirectory;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.NonFiniteLossException;
import ai.djl.memopt.finetune.StepResult;
import ai.djl.memopt.finetune.TokenBatch;
import ai.djl.memopt.finetune.TokenDataset;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.safetensors.CrashPoints;
import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.file.Path;
import java.util.List;
import java.util.Locale;
import java.util.function.Function;

/**
 * The training loop of {@code memopt finetune} with its output: a JSON line per step ({@code --json}) or a progress
 * bar, training checkpoints every {@code --checkpoint-every} steps and at the end (this run's newest
 * {@code --keep-checkpoints} kept), the final model or adapter, and the summary. Numbers that are not finite are
 * written as JSON {@code null}.
 */
final class FinetuneLoop {

    private final FinetuneCommand cmd;

    private final Function<TokenBatch, StepResult> stepper;

    /** @param stepper one optimizer step: the tuner's, or a data-parallel tuner's over its replicas */
    FinetuneLoop(FinetuneCommand cmd, Function<TokenBatch, StepResult> stepper) {
        this.cmd = cmd;
        this.stepper = stepper;
    }

    /**
     * Trains to {@code --steps}, writing training checkpoints into {@code --save}'s {@code checkpoints/} as it goes
     * and the final model (or adapter) and tokenizer into {@code out}; returns the summary. Crash point:
     * {@code finetune-save.model-written}.
     */
    JsonObject train(FineTuner tuner, TokenDataset dataset, Device dev, Path tokenizerJson, Path out)
            throws IOException {
        Path checkpoints = cmd.save.resolve("checkpoints");
        int rows = cmd.batch * cmd.gradAccum;
        Double heldOutBefore = tuner.step() == 0 ? heldOutLoss(tuner, dataset) : null;
        ProgressBar bar = cmd.noProgress ? null : new ProgressBar(System.err, "train", cmd.steps);
        long start = System.nanoTime();
        long tokens = 0;
        long startStep = tuner.step();
        StepResult last = null;
        double firstLoss = Double.NaN;
        long skipped = 0;
        while (tuner.step() < cmd.steps) {
            TokenBatch b = dataset.trainBatch(tuner.dataPosition(), rows);
            long t0 = System.nanoTime();
            last = step(tuner, b);
            double seconds = (System.nanoTime() - t0) / 1e9;
            tokens += last.tokens();
            skipped += last.skipped() ? 1 : 0;
            if (Double.isNaN(firstLoss)) {
                firstLoss = last.loss();
            }
            long memory = MemoryStats.deviceBytesInUse(dev);
            if (cmd.json) {
                JsonObject o = new JsonObject();
                o.addProperty("event", "step");
                o.addProperty("step", last.step());
                number(o, "loss", last.loss());
                number(o, "lr", last.learningRate());
                number(o, "loss_scale", last.lossScale());
                o.addProperty("skipped", last.skipped());
                o.addProperty("tokens", last.tokens());
                number(o, "step_seconds", seconds);
                o.addProperty("memory_bytes", memory);
                System.out.println(o);
            }
            if (bar != null) {
                bar.update(last.step(), stepStatus(last, last.tokens() / seconds, memory));
            }
            if (cmd.checkpointEvery > 0 && tuner.step() % cmd.checkpointEvery == 0 && tuner.step() < cmd.steps) {
                writeCheckpoint(tuner, checkpoints);
            }
        }
        if (bar != null) {
            bar.finish();
        }
        double elapsed = (System.nanoTime() - start) / 1e9;
        if (last != null) {
            writeCheckpoint(tuner, checkpoints);
        }
        List<String> loraWarnings = List.of();
        if (cmd.loraTrainable >= 0) {
            // warnings (what PEFT's file says differently, without changing outputs) are also logged
            loraWarnings = Lora.save(tuner.model(), out, cmd.source.model != null ? cmd.source.model.toString()
                    : cmd.source.preset);
        } else {
            tuner.saveModel(out);
        }
        FinetuneCommand.copyTokenizer(tokenizerJson, out);
        CrashPoints.reach("finetune-save.model-written");
        Double heldOutAfter = heldOutLoss(tuner, dataset);
        JsonObject o = new JsonObject();
        o.addProperty("event", "done");
        o.addProperty("steps", tuner.step());
        o.addProperty("steps_run", tuner.step() - startStep);
        number(o, "first_loss", firstLoss);
        number(o, "last_loss", last != null ? last.loss() : Double.NaN);
        if (heldOutBefore != null) {
            number(o, "held_out_loss_before", heldOutBefore);
        }
        if (heldOutAfter != null) {
            number(o, "held_out_loss", heldOutAfter);
        }
        o.addProperty("held_out_sequences", dataset.heldOutSequences());
        o.addProperty("skipped_steps", skipped);
        number(o, "loss_scale", tuner.lossScale());
        number(o, "tokens_per_second", tokens / elapsed);
        o.addProperty("peak_memory_bytes", dev.isGpu() ? MemoryStats.deviceBytesInUse(dev)
                : MemoryStats.peakResidentBytes());
        o.addProperty("precision", tuner.precision().name().toLowerCase(Locale.ROOT));
        o.addProperty("checkpointing", tuner.checkpointing());
        if (cmd.loraTrainable >= 0) {
            o.addProperty("lora_rank", cmd.loraRank);
            o.addProperty("lora_trainable_parameters", cmd.loraTrainable);
            o.addProperty("quantized_base", cmd.quantize != null ? cmd.quantize.toLowerCase(Locale.ROOT) : "none");
            if (!loraWarnings.isEmpty()) {
                JsonArray w = new JsonArray();
                loraWarnings.forEach(w::add);
                o.add("lora_save_warnings", w);
            }
        }
        o.addProperty("save", cmd.save.toString());
        return o;
    }

    /** One step; a non-finite loss ends the run with an error (and, with {@code --json}, an error line). */
    private StepResult step(FineTuner tuner, TokenBatch b) {
        try {
            return stepper.apply(b);
        } catch (NonFiniteLossException e) {
            if (cmd.json) {
                JsonObject o = new JsonObject();
                o.addProperty("event", "error");
                o.addProperty("step", e.step());
                o.addProperty("message", e.getMessage());
                System.out.println(o);
            }
            throw e;
        }
    }

    /** Prints the summary once {@code --save} is in place. */
    void report(JsonObject done) {
        if (cmd.json) {
            System.out.println(done);
        } else {
            JsonElement heldOutAfter = done.get("held_out_loss");
            System.out.printf(Locale.ROOT, "trained to step %d: loss %s -> %s%s; %s saved to %s%n",
                    done.get("steps").getAsLong(), loss(done.get("first_loss")), loss(done.get("last_loss")),
                    heldOutAfter != null ? ", held-out loss " + loss(heldOutAfter) : "",
                    cmd.loraTrainable >= 0 ? "LoRA adapter" : "model", cmd.save);
        }
        if (cmd.merge) {
            System.err.println("memopt finetune: merged model written to " + cmd.save.resolve("merged"));
        }
    }

    /** The devices' names as a JSON array. */
    static JsonArray names(List<Device> devices) {
        JsonArray a = new JsonArray();
        devices.forEach(d -> a.add(d.toString()));
        return a;
    }

    private static String loss(JsonElement value) {
        return value.isJsonNull() ? "n/a" : String.format(Locale.ROOT, "%.4f", value.getAsDouble());
    }

    /** Adds a number, or null where it is NaN or infinite (which JSON cannot hold). */
    private static void number(JsonObject o, String key, double value) {
        if (Double.isFinite(value)) {
            o.addProperty(key, value);
        } else {
            o.add(key, JsonNull.INSTANCE);
        }
    }

    /** Mean loss over the held-out sequences (in micro-batches of --batch), or null without a held-out split. */
    private Double heldOutLoss(FineTuner tuner, TokenDataset dataset) {
        int n = dataset.heldOutSequences();
        if (n == 0) {
            return null;
        }
        double sum = 0;
        for (int from = 0; from < n; from += cmd.batch) {
            int to = Math.min(n, from + cmd.batch);
            sum += tuner.evaluate(dataset.heldOutBatch(from, to)) * (to - from);
        }
        return sum / n;
    }

    /**
     * Writes this step's checkpoint (replacing one of that name, which may be another run's: said so), then deletes
     * this run's beyond the newest {@code --keep-checkpoints}.
     */
    private void writeCheckpoint(FineTuner tuner, Path checkpoints) throws IOException {
        Path dir = checkpoints.resolve(String.format(Locale.ROOT, "step-%08d", tuner.step()));
        if (CheckpointDirectory.otherRuns(checkpoints, tuner.runIdentity()).contains(dir)) {
            System.err.println("memopt finetune: replacing " + dir + ", a checkpoint of another run");
        }
        tuner.saveCheckpoint(dir);
        CheckpointDirectory.prune(checkpoints, tuner.runIdentity(), cmd.keepCheckpoints);
    }

    private static String stepStatus(StepResult r, double tokensPerSecond, long memory) {
        float scale = r.lossScale();
        return String.format(Locale.ROOT, "loss %.4f  %.0f tok/s  scale %s  mem %.1f MB%s", r.loss(), tokensPerSecond,
                scale == Math.rint(scale) ? Long.toString((long) scale) : Float.toString(scale), memory / 1e6,
                r.skipped() ? " (skipped)" : "");
    }
}
