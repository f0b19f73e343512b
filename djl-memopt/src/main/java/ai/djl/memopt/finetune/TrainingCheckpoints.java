package ai.djl.memopt.finetune;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.CrashPoints;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.jni.JniUtils;
import com.google.common.base.Preconditions;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;

/**
 * Training checkpoints of a {@link FineTuner}: a directory with {@code config.json} and {@code model.safetensors} (FP32
 * weights - the masters in FP16 mode - under the Hugging Face names, so the directory also loads as a model),
 * {@code optimizer.safetensors} ({@code <name>.exp_avg}, {@code <name>.exp_avg_sq} or {@code <name>.momentum_buffer}),
 * {@code trainer_state.json} (step, data position, seed, per-parameter optimizer steps, loss scaler, settings, and the
 * {@link RunIdentity} of the run) and, written last, {@code manifest.json} (the size and SHA-256 of each file; see
 * {@link CheckpointManifest}).
 *
 * <p>A checkpoint is written into a hidden sibling directory and put in place as a whole
 * ({@link AtomicFiles#replaceDirectory}): a crash leaves it complete or absent. Restoring verifies the checksums and
 * that the checkpoint belongs to this run before it puts weights, FP32 masters and optimizer state back, so that N
 * steps, save, restore, M steps gives the weights of N + M uninterrupted steps, bit for bit.
 *
 * <p>Crash points ({@link CrashPoints}) of a save: {@code checkpoint.weights-written},
 * {@code checkpoint.optimizer-written}, {@code checkpoint.state-written}, {@code checkpoint.manifest-written}, then
 * those of {@link AtomicFiles#replaceDirectory}.
 */
final class TrainingCheckpoints {

    private static final int STATE_FORMAT = 2;

    /** Where a restored run continues. */
    record Progress(long step, long dataPosition) {}

    private TrainingCheckpoints() {}

    /**
     * The identity {@link FineTuner} gives a run from its own settings: the model's configuration and trainable
     * parameters (names, shapes, types), precision, optimizer, learning-rate schedule, gradient accumulation and seed.
     */
    static RunIdentity runIdentity(FineTuner tuner) {
        StringBuilder params = new StringBuilder();
        for (Map.Entry<String, Parameter> e : tuner.parameters().entrySet()) {
            NDArray a = e.getValue().getArray();
            params.append(e.getKey()).append(' ').append(a.getShape()).append(' ').append(a.getDataType())
                    .append(e.getValue().requiresGradient() ? " trained\n" : " frozen\n");
        }
        StatefulOptimizer o = tuner.optimizer();
        LearningRateSchedule lr = tuner.schedule();
        Map<String, String> m = new LinkedHashMap<>();
        m.put("model_config", "sha256:" + RunIdentity.sha256(tuner.model().config().toJson()
                .getBytes(StandardCharsets.UTF_8)).substring(0, 16));
        m.put("parameters", tuner.parameters().size() + " tensors, sha256:"
                + RunIdentity.sha256(params.toString().getBytes(StandardCharsets.UTF_8)).substring(0, 16));
        m.put("precision", tuner.precision().name().toLowerCase(Locale.ROOT));
        m.put("optimizer", String.format(Locale.ROOT, "%s betas=(%s, %s) eps=%s weight_decay=%s momentum=%s",
                o.kind().name().toLowerCase(Locale.ROOT), o.beta1(), o.beta2(), o.epsilon(), o.weightDecay(),
                o.momentum()));
        m.put("schedule", String.format(Locale.ROOT, "peak=%s warmup=%s total=%s min_ratio=%s", lr.peak(),
                lr.warmup(), lr.total(), lr.minRatio()));
        m.put("gradient_accumulation", Integer.toString(tuner.gradientAccumulation()));
        m.put("seed", Long.toString(tuner.seed()));
        return RunIdentity.of(m);
    }

    /** Writes FP32 weights by name into a safetensors file (atomically). */
    static void writeWeights(Path file, Map<String, NDArray> weights) throws IOException {
        SafetensorsWriter writer = new SafetensorsWriter().putMetadata("format", "pt");
        for (Map.Entry<String, NDArray> e : weights.entrySet()) {
            NDArray a = e.getValue();
            if (a.getDataType() == DataType.FLOAT32) {
                writer.add(e.getKey(), a);
            } else {
                // a frozen weight held only as its FP16 working copy: widened one tensor at a time while writing
                writer.add(e.getKey(), SafetensorsDType.F32, a.getShape().getShape(), () -> {
                    try (NDArray wide = a.toType(DataType.FLOAT32, true)) {
                        return wide.toByteBuffer();
                    }
                });
            }
        }
        writer.write(file);
    }

    /** Saves {@code tuner}'s training state as the directory {@code dir} (replacing an older one of that name). */
    static void save(FineTuner tuner, Path dir) throws IOException {
        AtomicFiles.replaceDirectory(dir, tmp -> {
            writeWeights(tmp.resolve("model.safetensors"), tuner.update().fp32Weights());
            CrashPoints.reach("checkpoint.weights-written");
            StatefulOptimizer optimizer = tuner.optimizer();
            SafetensorsWriter opt = new SafetensorsWriter().putMetadata("format", "pt");
            JsonObject steps = new JsonObject();
            for (Map.Entry<String, Parameter> e : tuner.parameters().entrySet()) {
                String id = e.getValue().getId();
                steps.addProperty(e.getKey(), optimizer.stepCount(id));
                for (Map.Entry<String, NDArray> s : optimizer.stateArrays(id).entrySet()) {
                    opt.add(e.getKey() + "." + s.getKey(), s.getValue());
                }
            }
            opt.write(tmp.resolve("optimizer.safetensors"));
            CrashPoints.reach("checkpoint.optimizer-written");
            AtomicFiles.writeString(tmp.resolve("config.json"), tuner.model().config().toJson() + "\n");
            AtomicFiles.writeString(tmp.resolve("trainer_state.json"),
                    new GsonBuilder().setPrettyPrinting().create().toJson(state(tuner, steps)) + "\n");
            CrashPoints.reach("checkpoint.state-written");
            CheckpointManifest.write(tmp);
            CrashPoints.reach("checkpoint.manifest-written");
        });
    }

    /** The content of {@code trainer_state.json}. */
    private static JsonObject state(FineTuner tuner, JsonObject parameterSteps) {
        StatefulOptimizer optimizer = tuner.optimizer();
        JsonObject state = new JsonObject();
        state.addProperty("format", STATE_FORMAT);
        state.addProperty("step", tuner.step());
        state.addProperty("data_position", tuner.dataPosition());
        state.addProperty("seed", tuner.seed());
        state.addProperty("precision", tuner.precision().name().toLowerCase(Locale.ROOT));
        state.addProperty("checkpointing", tuner.checkpointing());
        state.addProperty("gradient_accumulation", tuner.gradientAccumulation());
        state.addProperty("run_id", tuner.runIdentity().id());
        state.add("identity", tuner.runIdentity().toJson());
        JsonObject o = new JsonObject();
        o.addProperty("kind", optimizer.kind().name().toLowerCase(Locale.ROOT));
        o.addProperty("beta1", optimizer.beta1());
        o.addProperty("beta2", optimizer.beta2());
        o.addProperty("epsilon", optimizer.epsilon());
        o.addProperty("weight_decay", optimizer.weightDecay());
        o.addProperty("momentum", optimizer.momentum());
        o.add("parameter_steps", parameterSteps);
        state.add("optimizer", o);
        LearningRateSchedule schedule = tuner.schedule();
        JsonObject lr = new JsonObject();
        lr.addProperty("peak", schedule.peak());
        lr.addProperty("warmup", schedule.warmup());
        lr.addProperty("total", schedule.total());
        lr.addProperty("min_ratio", schedule.minRatio());
        state.add("schedule", lr);
        if (tuner.lossScaler() != null) {
            state.add("loss_scaler", JsonParser.parseString(tuner.lossScaler().toJson()));
        }
        return state;
    }

    /** Whether {@code dir} looks like a training checkpoint. */
    static boolean isCheckpoint(Path dir) {
        return Files.isRegularFile(dir.resolve("trainer_state.json"))
                && Files.isRegularFile(dir.resolve("model.safetensors"));
    }

    /**
     * Restores weights, FP32 masters, optimizer state and loss scaler into {@code tuner} from a checkpoint of the same
     * run (see {@link RunIdentity}) and gives it zero gradient buffers, the state of an uninterrupted run
     * ({@link ParameterUpdate#createGradients}); returns the step and data position to continue from. Nothing is
     * restored unless every file matches the manifest's checksums and the identities agree.
     *
     * @throws IllegalArgumentException naming the file and field that does not match, or what differs between the runs
     * @throws IOException if a file is missing or corrupt
     */
    static Progress restore(FineTuner tuner, Path dir) throws IOException {
        Path stateFile = dir.resolve("trainer_state.json");
        if (!isCheckpoint(dir)) {
            throw new IOException(dir + " is not a training checkpoint (no trainer_state.json / model.safetensors)");
        }
        JsonObject state = readState(dir);
        int format = intField(state, "format", stateFile);
        Preconditions.checkArgument(format == STATE_FORMAT, "%s: format %s, this version reads %s%s", stateFile,
                format, STATE_FORMAT, format < STATE_FORMAT ? " (the checkpoint was written by an earlier version,"
                        + " without checksums or run identity, and cannot be verified: start the run again)" : "");
        CheckpointManifest.verify(dir);
        DeepSeekConfig config = DeepSeekConfig.fromJson(dir.resolve("config.json"));
        Preconditions.checkArgument(config.equals(tuner.model().config()),
                "%s: the checkpoint's model config differs from the model being trained", dir.resolve("config.json"));
        String p = stringField(state, "precision", stateFile);
        Preconditions.checkArgument(FineTuner.Precision.parse(p) == tuner.precision(),
                "%s: the checkpoint was trained in %s, this run uses %s", stateFile, p,
                tuner.precision().name().toLowerCase(Locale.ROOT));
        StatefulOptimizer optimizer = tuner.optimizer();
        JsonObject o = state.getAsJsonObject("optimizer");
        Preconditions.checkArgument(o != null, "%s has no optimizer object", stateFile);
        String kind = stringField(o, "kind", stateFile);
        Preconditions.checkArgument(StatefulOptimizer.Kind.parse(kind) == optimizer.kind(),
                "%s: the checkpoint's optimizer is %s, this run uses %s", stateFile, kind,
                optimizer.kind().name().toLowerCase(Locale.ROOT));
        List<String> differences = tuner.runIdentity().differences(identity(state, stateFile));
        Preconditions.checkArgument(differences.isEmpty(), "%s was written by a different run; it differs in:\n  %s",
                dir, String.join("\n  ", differences));
        JsonObject steps = o.getAsJsonObject("parameter_steps");
        Preconditions.checkArgument(steps != null, "%s has no optimizer.parameter_steps", stateFile);
        long newStep = longField(state, "step", stateFile);
        long newPosition = longField(state, "data_position", stateFile);
        Preconditions.checkArgument(newStep >= 0 && newPosition >= 0, "%s: negative step or data position",
                stateFile);
        DynamicLossScaler scaler = null;
        if (tuner.precision() == FineTuner.Precision.FP16) {
            Preconditions.checkArgument(state.has("loss_scaler"), "%s has no loss_scaler (FP16 run)", stateFile);
            scaler = DynamicLossScaler.fromJson(state.get("loss_scaler").toString());
        }
        restoreArrays(tuner, dir, steps);
        if (scaler != null) {
            tuner.update().setScaler(scaler);
        }
        tuner.update().zeroGradients();
        if (newStep > 0) {
            if (!tuner.fusedUpdate()) { // a fused update frees every gradient after each step
                tuner.update().createGradients();
            }
        }
        return new Progress(newStep, newPosition);
    }

    /** The optimizer state arrays a checkpoint may hold per parameter (StatefulOptimizer.stateArrays names). */
    private static final String[] STATE_KEYS = {"exp_avg", "exp_avg_sq", "momentum_buffer", "exp_avg.code",
        "exp_avg.absmax", "exp_avg_sq.code", "exp_avg_sq.absmax"};

    /** Copies the weights and optimizer state of the checkpoint {@code dir} into {@code tuner}. */
    private static void restoreArrays(FineTuner tuner, Path dir, JsonObject steps) throws IOException {
        Path stateFile = dir.resolve("trainer_state.json");
        Map<String, Parameter> parameters = tuner.parameters();
        try (NDManager tmp = tuner.model().manager().newSubManager();
                SafetensorsFile weights = SafetensorsFile.open(dir.resolve("model.safetensors"));
                SafetensorsFile opt = SafetensorsFile.open(dir.resolve("optimizer.safetensors"))) {
            for (String name : parameters.keySet()) {
                Preconditions.checkArgument(weights.contains(name), "%s has no tensor %s",
                        dir.resolve("model.safetensors"), name);
                Preconditions.checkArgument(steps.has(name), "%s: optimizer.parameter_steps has no %s", stateFile,
                        name);
            }
            boolean gradMode = JniUtils.isGradMode();
            JniUtils.setGradMode(false); // in-place writes into leaves that require grad
            try {
                for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
                    String name = e.getKey();
                    NDArray w = e.getValue().getArray();
                    NDArray loaded = weights.load(tmp, name, DataType.FLOAT32).toDevice(w.getDevice(), false);
                    Preconditions.checkArgument(loaded.getShape().equals(w.getShape()),
                            "%s: tensor %s has shape %s, the model's is %s", dir.resolve("model.safetensors"), name,
                            loaded.getShape(), w.getShape());
                    tuner.update().setWeight(name, loaded);
                    Map<String, NDArray> arrays = new LinkedHashMap<>();
                    for (String key : STATE_KEYS) {
                        if (opt.contains(name + "." + key)) { // 8-bit codes in their own type (UINT8), the rest FP32
                            arrays.put(key, key.endsWith(".code") ? opt.load(tmp, name + "." + key)
                                    : opt.load(tmp, name + "." + key, DataType.FLOAT32));
                        }
                    }
                    tuner.optimizer().restore(e.getValue().getId(), name, steps.get(name).getAsLong(), arrays, w);
                }
            } finally {
                JniUtils.setGradMode(gradMode);
            }
        }
    }

    /** The parsed {@code trainer_state.json} of a checkpoint. */
    private static JsonObject readState(Path checkpoint) throws IOException {
        Path f = checkpoint.resolve("trainer_state.json");
        try {
            return JsonParser.parseString(Files.readString(f, StandardCharsets.UTF_8)).getAsJsonObject();
        } catch (RuntimeException e) {
            throw new IOException(f + " is not a JSON object: " + e.getMessage(), e);
        }
    }

    /** The step recorded in a checkpoint's {@code trainer_state.json}. */
    static long readStep(Path checkpoint) throws IOException {
        return longField(readState(checkpoint), "step", checkpoint.resolve("trainer_state.json"));
    }

    /** A checkpoint's step and run id ({@code null} for a checkpoint of an earlier format, which has none). */
    static CheckpointDirectory.Entry entry(Path checkpoint) throws IOException {
        JsonObject state = readState(checkpoint);
        Path f = checkpoint.resolve("trainer_state.json");
        String runId = state.has("run_id") ? stringField(state, "run_id", f) : null;
        return new CheckpointDirectory.Entry(checkpoint, longField(state, "step", f), runId);
    }

    /** The run identity a checkpoint records (empty for an earlier format). */
    static RunIdentity identity(Path checkpoint) throws IOException {
        return identity(readState(checkpoint), checkpoint.resolve("trainer_state.json"));
    }

    private static RunIdentity identity(JsonObject state, Path stateFile) {
        JsonElement id = state.get("identity");
        if (id == null) {
            return RunIdentity.of(Map.of());
        }
        Preconditions.checkArgument(id.isJsonObject(), "%s: identity is not a JSON object", stateFile);
        return RunIdentity.fromJson(id.getAsJsonObject(), stateFile.toString());
    }

    private static String stringField(JsonObject o, String key, Path file) {
        Preconditions.checkArgument(o.has(key) && o.get(key).isJsonPrimitive(), "%s has no field '%s'", file, key);
        return o.get(key).getAsString();
    }

    private static long longField(JsonObject o, String key, Path file) {
        try {
            return Long.parseLong(stringField(o, key, file));
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException(file + ": field '" + key + "' is not an integer", e);
        }
    }

    private static int intField(JsonObject o, String key, Path file) {
        return Math.toIntExact(longField(o, key, file));
    }
}
