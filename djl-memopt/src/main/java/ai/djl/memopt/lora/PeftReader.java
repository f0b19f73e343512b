package ai.djl.memopt.lora;

import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.nn.Block;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/** Reads PEFT adapters (see {@link PeftAdapters#load} and {@link PeftAdapters#readConfig}). */
final class PeftReader {

    private static final Pattern TENSOR_NAME = Pattern.compile("(.+)\\.lora_([AB])(\\.[A-Za-z0-9_\\-]+)?\\.weight");

    private PeftReader() {}

    static LoraReport load(Block root, Path directory, NDManager manager) throws IOException {
        LoraConfig config = readConfig(directory);
        Path weights = directory.resolve(PeftAdapters.WEIGHTS_FILE);
        if (!Files.exists(weights) && Files.exists(directory.resolve("adapter_model.bin"))) {
            throw new IllegalArgumentException(directory + " holds adapter_model.bin (pickle); only "
                    + PeftAdapters.WEIGHTS_FILE + " is read: re-save the adapter with safe_serialization=True");
        }
        try (SafetensorsFile file = SafetensorsFile.open(weights)) {
            Map<String, String[]> byPrefix = parseNames(file);
            Map<String, LoraLinear> existing = Lora.adapters(root);
            List<LoraTargets.Target> targets = LoraTargets.resolve(root, config, !existing.isEmpty());
            if (!existing.isEmpty()) {
                checkExisting(directory, config, existing, targets);
            }
            LoraTargets.View view = new LoraTargets.View(root);
            List<PeftLayout.Unit> units = PeftLayout.units(view, targets);
            checkNames(root, weights, config, byPrefix.keySet(), units, !existing.isEmpty());
            for (PeftLayout.Unit u : units) {
                long[][] shapes = PeftLayout.shapes(u, view.modules, root);
                checkShape(file, u.nameA(), shapes[0], u, 0);
                checkShape(file, u.nameB(), shapes[1], u, 1);
            }

            if (existing.isEmpty()) {
                Lora.apply(root, config, manager);
            }
            Map<String, LoraLinear> adapters = Lora.adapters(root);
            for (PeftLayout.Unit u : units) {
                LoraLinear any = adapters.get(u.paths.get(0));
                try (NDManager scope = any.loraA().getArray().getManager().newSubManager()) {
                    if (!u.fused()) {
                        any.setAdapterWeights(file.load(scope, u.nameA()), file.load(scope, u.nameB()));
                        continue;
                    }
                    float[] a = file.readFloats(u.nameA());
                    float[] b = file.readFloats(u.nameB());
                    for (int e = 0; e < u.experts; e++) {
                        List<String> paths = u.expertPaths(e);
                        long[] outs = new long[paths.size()];
                        for (int i = 0; i < outs.length; i++) {
                            outs[i] = adapters.get(paths.get(i)).outFeatures();
                        }
                        LoraLinear first = adapters.get(paths.get(0));
                        NDArray[][] ab = FusedExperts.split(a, b, u.experts, u.rank, first.inFeatures(), outs, e,
                                scope);
                        for (int i = 0; i < outs.length; i++) {
                            adapters.get(paths.get(i)).setAdapterWeights(ab[i][0], ab[i][1]);
                        }
                    }
                }
            }
            List<String> paths = new ArrayList<>();
            targets.forEach(t -> paths.add(t.path));
            return Lora.report(root, paths);
        }
    }

    private static void checkExisting(Path directory, LoraConfig config, Map<String, LoraLinear> existing,
            List<LoraTargets.Target> targets) {
        Set<String> targeted = new TreeSet<>();
        for (LoraTargets.Target t : targets) {
            LoraLinear l = existing.get(t.path);
            if (l == null) {
                throw new IllegalArgumentException(directory.resolve(PeftAdapters.CONFIG_FILE) + " (" + config
                        + ") targets '" + t.path + "', which has no adapter in the model (its adapters: "
                        + existing.size() + " modules)");
            }
            if (l.rank() != t.rank || Float.compare(l.alpha(), t.alpha) != 0 || l.useRslora() != config.useRslora()) {
                throw new IllegalArgumentException(directory.resolve(PeftAdapters.CONFIG_FILE) + " has r=" + t.rank
                        + ", lora_alpha=" + t.alpha + (config.useRslora() ? ", rslora" : "") + " for '" + t.key
                        + "' but the model's adapter at '" + t.path + "' is " + l);
            }
            targeted.add(t.path);
        }
        for (String path : existing.keySet()) {
            if (!targeted.contains(path)) {
                throw new IllegalArgumentException("the model's adapter at '" + path + "' is not targeted by "
                        + directory.resolve(PeftAdapters.CONFIG_FILE) + " (" + config + ")");
            }
        }
    }

    /** Tensor prefix (the module path PEFT stores) -> {lora_A name, lora_B name}. */
    private static Map<String, String[]> parseNames(SafetensorsFile file) {
        Map<String, String[]> out = new LinkedHashMap<>();
        for (String name : file.names()) {
            Matcher m = TENSOR_NAME.matcher(name);
            if (!name.startsWith(PeftAdapters.PREFIX) || !m.matches()) {
                throw new IllegalArgumentException(file.path() + ": tensor '" + name + "' is not a PEFT LoRA weight "
                        + "(expected '" + PeftAdapters.PREFIX + "<module>.lora_A.weight' or '.lora_B.weight'; embedding"
                        + " adapters, DoRA magnitudes, biases and modules_to_save are not supported)");
            }
            String module = m.group(1).substring(PeftAdapters.PREFIX.length());
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

    private static void checkNames(Block root, Path weights, LoraConfig config, Set<String> inFile,
            List<PeftLayout.Unit> units, boolean existing) {
        Map<String, PeftLayout.Unit> expected = new LinkedHashMap<>();
        for (PeftLayout.Unit u : units) {
            expected.put(u.prefix, u);
        }
        Set<String> missing = new TreeSet<>(expected.keySet());
        missing.removeAll(inFile);
        if (!missing.isEmpty()) {
            String m = missing.iterator().next();
            PeftLayout.Unit u = expected.get(m);
            throw new IllegalArgumentException(weights + ": no tensor '" + u.nameA() + "' for " + (u.fused()
                    ? "the fused routed-expert parameter '" + u.key + "'" : "module '" + m + "'") + ", which "
                    + (existing ? "has an adapter in the model" : "adapter_config.json targets (" + config + ")")
                    + (missing.size() > 1 ? "; " + missing.size() + " modules lack tensors" : ""));
        }
        Set<String> extra = new TreeSet<>(inFile);
        extra.removeAll(expected.keySet());
        if (!extra.isEmpty()) {
            String m = extra.iterator().next();
            Map<String, Block> modules = Lora.peftModules(root);
            String base = m.endsWith(".base_layer") ? m.substring(0, m.length() - ".base_layer".length()) : m;
            String why = !modules.containsKey(base) ? "the model has no module '" + base + "'"
                    : existing ? "the model's module '" + m + "' has no adapter"
                    : "adapter_config.json (" + config + ") does not target '" + m + "'";
            throw new IllegalArgumentException(weights + ": tensor '" + PeftAdapters.PREFIX + m + ".lora_A.weight' "
                    + "does not fit the model: " + why + (extra.size() > 1 ? "; " + extra.size() + " such modules"
                    : ""));
        }
    }

    private static void checkShape(SafetensorsFile file, String name, long[] expected, PeftLayout.Unit u, int which) {
        TensorInfo info = file.info(name);
        if (!info.dtype().isFloating()) {
            throw new IllegalArgumentException(file.path() + ": tensor '" + name + "' has type " + info.dtype()
                    + ", expected a floating-point type");
        }
        if (!Arrays.equals(info.shape(), expected)) {
            long fileRank = info.shape().length == 2 ? info.shape()[which == 0 ? 0 : 1] / u.experts : -1;
            throw new IllegalArgumentException(file.path() + ": tensor '" + name + "' has shape "
                    + Arrays.toString(info.shape()) + ", expected " + Arrays.toString(expected)
                    + (u.fused() ? " (" + u.experts + " experts x rank " + u.rank + ")" : "")
                    + (fileRank >= 0 && fileRank != u.rank ? " (rank " + fileRank + " in the tensor, r=" + u.rank
                    + " in adapter_config.json for '" + u.key + "')" : " (the model's projection has other dimensions)"));
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // adapter_config.json

    static LoraConfig readConfig(Path directory) throws IOException {
        Path file = directory.resolve(PeftAdapters.CONFIG_FILE);
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

    static LoraConfig configFromJson(JsonObject json, String source) {
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
                "alora_invocation_tokens", "layer_replication", "layers_pattern", "use_bdlora", "arrow_config",
                "velora_config", "kasa_config", "monteclora_config"}) {
            JsonElement v = json.get(key);
            boolean empty = v == null || v.isJsonNull() || (v.isJsonArray() && v.getAsJsonArray().isEmpty())
                    || (v.isJsonObject() && v.getAsJsonObject().isEmpty());
            if (!empty) {
                throw new IllegalArgumentException(source + ": " + key + " = " + v + " is not supported");
            }
        }
        LoraConfig.Builder b = LoraConfig.builder();
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
        JsonElement parameters = json.get("target_parameters");
        if (parameters != null && !parameters.isJsonNull()) {
            if (!parameters.isJsonArray()) {
                throw new IllegalArgumentException(source + ": target_parameters must be a list (PEFT refuses a string"
                        + " too), got " + parameters);
            }
            b.optTargetParameters(strings(parameters, "target_parameters", source));
        }
        b.optRankPattern(pattern(json, "rank_pattern", source, true));
        b.optAlphaPattern(pattern(json, "alpha_pattern", source, false));
        JsonElement targets = json.get("target_modules");
        if (targets == null || targets.isJsonNull()) {
            if (parameters == null || parameters.isJsonNull() || parameters.getAsJsonArray().isEmpty()) {
                throw new IllegalArgumentException(source + ": target_modules is missing (PEFT's per-architecture"
                        + " defaults are not known here): list the module names");
            }
        } else if (targets.isJsonPrimitive()) {
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

    /** A rank_pattern (positive integers) or alpha_pattern (positive numbers) object, in file order. */
    private static <V> Map<String, V> pattern(JsonObject json, String key, String source, boolean integer) {
        Map<String, V> out = new LinkedHashMap<>();
        JsonElement v = json.get(key);
        if (v == null || v.isJsonNull()) {
            return out;
        }
        if (!v.isJsonObject()) {
            throw new IllegalArgumentException(source + ": " + key + " must be an object, got " + v);
        }
        for (Map.Entry<String, JsonElement> e : v.getAsJsonObject().entrySet()) {
            JsonElement n = e.getValue();
            if (!n.isJsonPrimitive() || !n.getAsJsonPrimitive().isNumber() || n.getAsDouble() <= 0
                    || integer && n.getAsDouble() != Math.rint(n.getAsDouble())) {
                throw new IllegalArgumentException(source + ": " + key + " '" + e.getKey() + "' must be a positive "
                        + (integer ? "integer" : "number") + ", got " + n);
            }
            @SuppressWarnings("unchecked")
            V value = (V) (integer ? (Object) n.getAsInt() : (Object) n.getAsFloat());
            out.put(e.getKey(), value);
        }
        return out;
    }

    private static void rejectUnless(JsonObject json, String source, String key, boolean expected, String why) {
        JsonElement v = json.get(key);
        if (v != null && !v.isJsonNull() && v.getAsBoolean() != expected) {
            throw new IllegalArgumentException(source + ": " + key + " = " + v + ": " + why);
        }
    }

}
