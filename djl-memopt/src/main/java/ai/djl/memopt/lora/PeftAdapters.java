package ai.djl.memopt.lora;

import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import com.google.common.base.Preconditions;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * LoRA adapters on disk in Hugging Face PEFT's layout, which {@code PeftModel.from_pretrained} loads and writes:
 * <ul>
 *   <li>{@code adapter_model.safetensors}: for every adapted module {@code <path>},
 *       {@code base_model.model.<path>.lora_A.weight} {@code (r, in)} and {@code base_model.model.<path>.lora_B.weight}
 *       {@code (out, r)} (PEFT drops the adapter name {@code default} when saving);</li>
 *   <li>{@code adapter_config.json}: {@code peft_type: LORA}, {@code r}, {@code lora_alpha}, {@code target_modules}
 *       and PEFT's other fields.</li>
 * </ul>
 * Module paths are those of the model block tree ({@code model.layers.0.self_attn.q_a_proj} on the DeepSeek model,
 * equal to transformers' module names). Features PEFT can describe but this package does not implement (DoRA,
 * per-module ranks, {@code modules_to_save}, bias training, fan-in-fan-out weights, ...) are refused with an error
 * naming the field, never silently ignored.
 *
 * <pre>{@code
 * PeftAdapters.save(model, dir, "deepseek-ai/DeepSeek-V2-Lite");
 * LoraReport r = PeftAdapters.load(otherModel, dir, null);
 * }</pre>
 */
public final class PeftAdapters {

    /** The weights file PEFT writes. */
    public static final String WEIGHTS_FILE = "adapter_model.safetensors";
    /** The config file PEFT writes. */
    public static final String CONFIG_FILE = "adapter_config.json";
    /** The prefix of every tensor name: PeftModel.base_model (LoraModel) .model (the transformers model). */
    public static final String PREFIX = "base_model.model.";

    private static final Pattern TENSOR_NAME = Pattern.compile("(.+)\\.lora_([AB])(\\.[A-Za-z0-9_\\-]+)?\\.weight");

    private PeftAdapters() {}

    // ------------------------------------------------------------------------------------------------------------
    // saving

    /**
     * Writes the adapters of {@code root} to {@code directory} (created if needed); each file is written atomically.
     * {@code target_modules} is written as the list of module names when that selects exactly the adapted modules
     * under PEFT's matching rules (with an {@code exclude_modules} pattern for routed experts if needed), otherwise as
     * a regex listing the adapted paths, so PEFT always rebuilds exactly these adapters.
     *
     * @param baseModelNameOrPath written as {@code base_model_name_or_path} (may be null)
     * @throws IllegalStateException if the model has no adapters
     * @throws IllegalArgumentException if adapters differ in rank, alpha or scaling (PEFT's per-module patterns are
     *     not written)
     * @throws IOException if writing fails
     */
    public static void save(Block root, Path directory, String baseModelNameOrPath) throws IOException {
        Map<String, LoraLinear> adapters = Lora.adapters(root);
        if (adapters.isEmpty()) {
            throw new IllegalStateException("the model has no LoRA adapters to save");
        }
        LoraLinear first = adapters.values().iterator().next();
        String firstPath = adapters.keySet().iterator().next();
        for (Map.Entry<String, LoraLinear> e : adapters.entrySet()) {
            LoraLinear l = e.getValue();
            if (l.rank() != first.rank() || Float.compare(l.alpha(), first.alpha()) != 0
                    || l.useRslora() != first.useRslora() || Float.compare(l.dropout(), first.dropout()) != 0) {
                throw new IllegalArgumentException("adapters differ: '" + firstPath + "' has " + first + " but '"
                        + e.getKey() + "' has " + l + "; PEFT rank_pattern/alpha_pattern are not written");
            }
        }
        if (Files.exists(directory) && !Files.isDirectory(directory)) {
            throw new IOException(directory + " exists and is not a directory");
        }
        Files.createDirectories(directory);

        SafetensorsWriter writer = new SafetensorsWriter().putMetadata("format", "pt");
        for (Map.Entry<String, LoraLinear> e : adapters.entrySet()) {
            writer.add(PREFIX + e.getKey() + ".lora_A.weight", e.getValue().loraA().getArray());
            writer.add(PREFIX + e.getKey() + ".lora_B.weight", e.getValue().loraB().getArray());
        }
        JsonObject config = configJson(first, root, adapters.keySet(), baseModelNameOrPath);
        writer.write(directory.resolve(WEIGHTS_FILE));
        AtomicFiles.writeString(directory.resolve(CONFIG_FILE),
                new GsonBuilder().setPrettyPrinting().serializeNulls().create().toJson(config) + "\n");
    }

    private static JsonObject configJson(LoraLinear adapter, Block root, Set<String> wrapped, String baseModel) {
        JsonObject c = new JsonObject();
        c.add("alpha_pattern", new JsonObject());
        c.add("auto_mapping", JsonNull.INSTANCE);
        c.add("base_model_name_or_path", baseModel == null ? JsonNull.INSTANCE : new JsonPrimitive(baseModel));
        c.addProperty("bias", "none");
        JsonElement[] targets = targetModulesJson(root, wrapped);
        c.add("exclude_modules", targets[1]);
        c.addProperty("fan_in_fan_out", false);
        c.addProperty("inference_mode", true);
        c.addProperty("init_lora_weights", true);
        c.add("layers_pattern", JsonNull.INSTANCE);
        c.add("layers_to_transform", JsonNull.INSTANCE);
        c.add("loftq_config", new JsonObject());
        c.add("lora_alpha", number(adapter.alpha()));
        c.addProperty("lora_bias", false);
        c.add("lora_dropout", number(adapter.dropout()));
        c.add("megatron_config", JsonNull.INSTANCE);
        c.addProperty("megatron_core", "megatron.core");
        c.add("modules_to_save", JsonNull.INSTANCE);
        c.addProperty("peft_type", "LORA");
        c.addProperty("r", adapter.rank());
        c.add("rank_pattern", new JsonObject());
        c.add("revision", JsonNull.INSTANCE);
        c.add("target_modules", targets[0]);
        c.addProperty("task_type", "CAUSAL_LM");
        c.addProperty("use_dora", false);
        c.addProperty("use_rslora", adapter.useRslora());
        return c;
    }

    private static JsonPrimitive number(float v) {
        return v == Math.rint(v) && Math.abs(v) < 1e9 ? new JsonPrimitive((long) v) : new JsonPrimitive(v);
    }

    /** {target_modules, exclude_modules} that select exactly {@code wrapped} under PEFT's rules. */
    static JsonElement[] targetModulesJson(Block root, Set<String> wrapped) {
        Set<String> modules = Lora.peftModules(root).keySet();
        List<String> names = new ArrayList<>(new LinkedHashSet<>(lastComponents(wrapped)));
        if (select(modules, names, null).equals(wrapped)) {
            return new JsonElement[] {stringArray(names), JsonNull.INSTANCE};
        }
        if (select(modules, names, LoraConfig.ROUTED_EXPERTS_REGEX).equals(wrapped)) {
            return new JsonElement[] {stringArray(names), new JsonPrimitive(LoraConfig.ROUTED_EXPERTS_REGEX)};
        }
        StringBuilder regex = new StringBuilder("(?:");
        boolean firstPath = true;
        for (String path : wrapped) {
            if (!firstPath) {
                regex.append('|');
            }
            firstPath = false;
            regex.append(escapeRegex(path));
        }
        return new JsonElement[] {new JsonPrimitive(regex.append(')').toString()), JsonNull.INSTANCE};
    }

    private static List<String> lastComponents(Set<String> paths) {
        List<String> out = new ArrayList<>();
        for (String p : paths) {
            out.add(p.substring(p.lastIndexOf('.') + 1));
        }
        return out;
    }

    private static Set<String> select(Set<String> modules, List<String> names, String excludeRegex) {
        Set<String> out = new LinkedHashSet<>();
        for (String m : modules) {
            if (!m.isEmpty() && LoraConfig.matchesAny(names, m)
                    && (excludeRegex == null || !Pattern.matches(excludeRegex, m))) {
                out.add(m);
            }
        }
        return out;
    }

    /** Escapes for both Python's {@code re} and Java (a backslash before every character but [A-Za-z0-9_]). */
    static String escapeRegex(String s) {
        StringBuilder b = new StringBuilder();
        for (char ch : s.toCharArray()) {
            if (!(Character.isLetterOrDigit(ch) && ch < 128) && ch != '_') {
                b.append('\\');
            }
            b.append(ch);
        }
        return b.toString();
    }

    private static JsonArray stringArray(List<String> values) {
        JsonArray a = new JsonArray();
        values.forEach(a::add);
        return a;
    }

    // ------------------------------------------------------------------------------------------------------------
    // loading

    /**
     * Reads {@code adapter_config.json} into a {@link LoraConfig} (routed experts allowed, as PEFT has no such
     * switch).
     *
     * @throws IllegalArgumentException naming the file and field for a missing or unsupported setting
     * @throws IOException if the file cannot be read
     */
    public static LoraConfig readConfig(Path directory) throws IOException {
        Path file = directory.resolve(CONFIG_FILE);
        JsonObject json;
        try {
            json = JsonParser.parseString(Files.readString(file, StandardCharsets.UTF_8)).getAsJsonObject();
        } catch (NoSuchFileException e) {
            throw new NoSuchFileException(file.toString(), null, "no PEFT adapter config");
        } catch (JsonParseException | IllegalStateException e) {
            throw new IllegalArgumentException(file + ": not a JSON object: " + e.getMessage(), e);
        }
        return configFromJson(json, file.toString());
    }

    /**
     * Converts a PEFT {@code adapter_config.json} object.
     *
     * @param source names the origin in error messages
     */
    public static LoraConfig configFromJson(JsonObject json, String source) {
        String peftType = string(json, "peft_type", source);
        if (!"LORA".equals(peftType)) {
            throw new IllegalArgumentException(source + ": peft_type is '" + peftType + "', expected 'LORA'");
        }
        rejectUnless(json, source, "use_dora", false, "DoRA is not supported");
        rejectUnless(json, source, "fan_in_fan_out", false, "fan-in-fan-out (Conv1D) weights are not supported");
        rejectUnless(json, source, "lora_bias", false, "trained LoRA biases are not supported");
        rejectUnless(json, source, "use_qalora", false, "QA-LoRA is not supported");
        JsonElement bias = json.get("bias");
        if (bias != null && !bias.isJsonNull() && !"none".equals(bias.getAsString())) {
            throw new IllegalArgumentException(source + ": bias is '" + bias.getAsString()
                    + "'; only 'none' is supported (biases are not trained)");
        }
        for (String key : new String[] {"modules_to_save", "layers_to_transform", "trainable_token_indices",
                "alora_invocation_tokens", "layer_replication", "target_parameters", "rank_pattern", "alpha_pattern"}) {
            JsonElement v = json.get(key);
            boolean empty = v == null || v.isJsonNull() || (v.isJsonArray() && v.getAsJsonArray().isEmpty())
                    || (v.isJsonObject() && v.getAsJsonObject().isEmpty());
            if (!empty) {
                throw new IllegalArgumentException(source + ": " + key + " = " + v + " is not supported");
            }
        }
        LoraConfig.Builder b = LoraConfig.builder().optRoutedExperts(true);
        JsonElement r = json.get("r");
        if (r == null || !r.isJsonPrimitive() || !r.getAsJsonPrimitive().isNumber()) {
            throw new IllegalArgumentException(source + ": field 'r' (the LoRA rank) is missing or not a number");
        }
        double rank = r.getAsDouble();
        if (rank != Math.rint(rank) || rank < 1) {
            throw new IllegalArgumentException(source + ": r must be a positive integer, got " + r);
        }
        b.setRank((int) rank);
        b.optAlpha(number(json, "lora_alpha", 8, source));
        b.optDropout(number(json, "lora_dropout", 0, source));
        JsonElement rs = json.get("use_rslora");
        b.optUseRslora(rs != null && !rs.isJsonNull() && rs.getAsBoolean());
        JsonElement targets = json.get("target_modules");
        if (targets == null || targets.isJsonNull()) {
            throw new IllegalArgumentException(source + ": target_modules is missing (PEFT's per-architecture"
                    + " defaults are not known here): list the module names");
        }
        if (targets.isJsonPrimitive()) {
            String t = targets.getAsString();
            if ("all-linear".equals(t)) {
                throw new IllegalArgumentException(source + ": target_modules 'all-linear' is not supported; list "
                        + "the module names");
            }
            b.optTargetRegex(t);
        } else {
            b.optTargetModules(strings(targets, "target_modules", source));
        }
        JsonElement exclude = json.get("exclude_modules");
        if (exclude != null && !exclude.isJsonNull()) {
            if (exclude.isJsonPrimitive()) {
                b.optExcludeRegex(exclude.getAsString());
            } else {
                b.optExcludeModules(strings(exclude, "exclude_modules", source));
            }
        }
        try {
            return b.build();
        } catch (IllegalArgumentException e) {
            throw new IllegalArgumentException(source + ": " + e.getMessage(), e);
        }
    }

    private static String string(JsonObject json, String key, String source) {
        JsonElement v = json.get(key);
        if (v == null || !v.isJsonPrimitive()) {
            throw new IllegalArgumentException(source + ": field '" + key + "' is missing or not a string");
        }
        return v.getAsString();
    }

    private static float number(JsonObject json, String key, float dflt, String source) {
        JsonElement v = json.get(key);
        if (v == null || v.isJsonNull()) {
            return dflt;
        }
        if (!v.isJsonPrimitive() || !v.getAsJsonPrimitive().isNumber()) {
            throw new IllegalArgumentException(source + ": field '" + key + "' must be a number, got " + v);
        }
        return v.getAsFloat();
    }

    private static List<String> strings(JsonElement v, String key, String source) {
        if (!v.isJsonArray()) {
            throw new IllegalArgumentException(source + ": " + key + " must be a string or a list, got " + v);
        }
        List<String> out = new ArrayList<>();
        for (JsonElement e : v.getAsJsonArray()) {
            if (!e.isJsonPrimitive()) {
                throw new IllegalArgumentException(source + ": " + key + " entries must be strings, got " + e);
            }
            out.add(e.getAsString());
        }
        return out;
    }

    private static void rejectUnless(JsonObject json, String source, String key, boolean expected, String why) {
        JsonElement v = json.get(key);
        if (v != null && !v.isJsonNull() && v.getAsBoolean() != expected) {
            throw new IllegalArgumentException(source + ": " + key + " = " + v + ": " + why);
        }
    }

    /**
     * Loads a PEFT adapter directory onto {@code root}. If the model has no adapters yet, they are created where
     * {@code adapter_config.json} targets ({@link Lora#apply}, everything else frozen); if it has, they must be exactly
     * the adapted modules of the file, with the file's rank and alpha, and their weights are overwritten. Everything
     * is validated before the model is touched: tensor names, that each targeted module has both tensors and each
     * tensor a targeted module, and shapes ({@code lora_A (r, in)}, {@code lora_B (out, r)}).
     *
     * @param manager owns new adapter weights (null: the base weights' managers)
     * @throws IllegalArgumentException naming the file and tensor or field at fault
     * @throws IOException if a file cannot be read
     */
    public static LoraReport load(Block root, Path directory, NDManager manager) throws IOException {
        LoraConfig config = readConfig(directory);
        Path weights = directory.resolve(WEIGHTS_FILE);
        if (!Files.exists(weights) && Files.exists(directory.resolve("adapter_model.bin"))) {
            throw new IllegalArgumentException(directory + " holds adapter_model.bin (pickle); only "
                    + WEIGHTS_FILE + " is read: re-save the adapter with safe_serialization=True");
        }
        try (SafetensorsFile file = SafetensorsFile.open(weights)) {
            Map<String, String[]> byModule = parseNames(file);
            Map<String, LoraLinear> existing = Lora.adapters(root);
            List<String> targets;
            Map<String, long[]> features = new LinkedHashMap<>();
            if (existing.isEmpty()) {
                targets = Lora.targets(root, config);
                Map<String, Block> modules = Lora.peftModules(root);
                for (String t : targets) {
                    features.put(t, features(modules.get(t), t, root));
                }
            } else {
                targets = new ArrayList<>(existing.keySet());
                for (Map.Entry<String, LoraLinear> e : existing.entrySet()) {
                    LoraLinear l = e.getValue();
                    if (l.rank() != config.rank() || Float.compare(l.alpha(), config.alpha()) != 0
                            || l.useRslora() != config.useRslora()) {
                        throw new IllegalArgumentException(directory.resolve(CONFIG_FILE) + " has r=" + config.rank()
                                + ", lora_alpha=" + config.alpha() + (config.useRslora() ? ", rslora" : "")
                                + " but the model's adapter at '" + e.getKey() + "' is " + l);
                    }
                    features.put(e.getKey(), new long[] {l.outFeatures(), l.inFeatures()});
                }
            }
            checkModules(root, weights, config, byModule.keySet(), targets, !existing.isEmpty());
            for (String path : targets) {
                String[] names = byModule.get(path);
                long out = features.get(path)[0];
                long in = features.get(path)[1];
                checkShape(file, names[0], new long[] {config.rank(), in}, config.rank());
                checkShape(file, names[1], new long[] {out, config.rank()}, config.rank());
            }

            if (existing.isEmpty()) {
                Lora.apply(root, config, manager);
            }
            Map<String, LoraLinear> adapters = Lora.adapters(root);
            for (String path : targets) {
                LoraLinear l = adapters.get(path);
                String[] names = byModule.get(path);
                try (NDManager scope = l.loraA().getArray().getManager().newSubManager()) {
                    NDArray a = file.load(scope, names[0]);
                    NDArray b = file.load(scope, names[1]);
                    l.setAdapterWeights(a, b);
                }
            }
            return Lora.report(root, targets);
        }
    }

    /** Module path -> {lora_A name, lora_B name}. */
    private static Map<String, String[]> parseNames(SafetensorsFile file) {
        Map<String, String[]> out = new LinkedHashMap<>();
        for (String name : file.names()) {
            Matcher m = TENSOR_NAME.matcher(name);
            if (!name.startsWith(PREFIX) || !m.matches()) {
                throw new IllegalArgumentException(file.path() + ": tensor '" + name + "' is not a PEFT LoRA weight "
                        + "(expected '" + PREFIX + "<module>.lora_A.weight' or '.lora_B.weight'; embedding adapters, "
                        + "DoRA magnitudes, biases and modules_to_save are not supported)");
            }
            String module = m.group(1).substring(PREFIX.length());
            int slot = "A".equals(m.group(2)) ? 0 : 1;
            String[] pair = out.computeIfAbsent(module, k -> new String[2]);
            if (pair[slot] != null) {
                throw new IllegalArgumentException(file.path() + ": module '" + module + "' has two lora_"
                        + m.group(2) + " tensors: '" + pair[slot] + "' and '" + name + "'");
            }
            pair[slot] = name;
        }
        for (Map.Entry<String, String[]> e : out.entrySet()) {
            String[] pair = e.getValue();
            if (pair[0] == null || pair[1] == null) {
                throw new IllegalArgumentException(file.path() + ": tensor '" + (pair[0] != null ? pair[0] : pair[1])
                        + "' has no matching lora_" + (pair[0] == null ? "A" : "B") + " tensor");
            }
        }
        if (out.isEmpty()) {
            throw new IllegalArgumentException(file.path() + ": no LoRA tensors");
        }
        return out;
    }

    private static void checkModules(Block root, Path weights, LoraConfig config, Set<String> inFile,
            List<String> targets, boolean existing) {
        Set<String> missing = new TreeSet<>(targets);
        missing.removeAll(inFile);
        if (!missing.isEmpty()) {
            String m = missing.iterator().next();
            throw new IllegalArgumentException(weights + ": no tensor '" + PREFIX + m + ".lora_A.weight' for module '"
                    + m + "', which " + (existing ? "has an adapter in the model" : "adapter_config.json targets ("
                    + config + ")") + (missing.size() > 1 ? "; " + missing.size() + " modules lack tensors" : ""));
        }
        Set<String> extra = new TreeSet<>(inFile);
        extra.removeAll(targets);
        if (!extra.isEmpty()) {
            String m = extra.iterator().next();
            Map<String, Block> modules = Lora.peftModules(root);
            String why = !modules.containsKey(m) ? "the model has no module '" + m + "'"
                    : existing ? "the model's module '" + m + "' has no adapter"
                    : "adapter_config.json (" + config + ") does not target '" + m + "'";
            throw new IllegalArgumentException(weights + ": tensor '" + PREFIX + m + ".lora_A.weight' does not fit "
                    + "the model: " + why + (extra.size() > 1 ? "; " + extra.size() + " such modules" : ""));
        }
    }

    private static void checkShape(SafetensorsFile file, String name, long[] expected, int rank) {
        TensorInfo info = file.info(name);
        if (!info.dtype().isFloating()) {
            throw new IllegalArgumentException(file.path() + ": tensor '" + name + "' has type " + info.dtype()
                    + ", expected a floating-point type");
        }
        if (!Arrays.equals(info.shape(), expected)) {
            boolean a = name.contains(".lora_A.");
            long fileRank = info.shape().length == 2 ? info.shape()[a ? 0 : 1] : -1;
            throw new IllegalArgumentException(file.path() + ": tensor '" + name + "' has shape "
                    + Arrays.toString(info.shape()) + ", expected " + Arrays.toString(expected)
                    + (fileRank >= 0 && fileRank != rank ? " (rank " + fileRank + " in the tensor, r=" + rank
                    + " in adapter_config.json)" : " (the model's projection has other dimensions)"));
        }
    }

    /** {out, in} of a projection. */
    private static long[] features(Block block, String path, Block root) {
        if (block instanceof Linear) {
            Parameter w = block.getParameters().get("weight");
            Preconditions.checkArgument(w.isInitialized(), "projection '%s' has no weight yet", path);
            Shape s = w.getArray().getShape();
            return new long[] {s.get(0), s.get(1)};
        }
        NDManager parent = null;
        for (Block b : new Block[] {block, root}) {
            for (Parameter p : b.getParameters().values()) {
                if (parent == null && p.isInitialized()) {
                    parent = p.getArray().getManager();
                }
            }
        }
        Preconditions.checkArgument(parent != null, "cannot read the dimensions of '%s' (%s)", path,
                block.getClass().getSimpleName());
        try (NDManager probe = parent.newSubManager()) {
            Shape s = LinearWeightSource.weightOf(block, probe).getShape();
            return new long[] {s.get(0), s.get(1)};
        }
    }
}
