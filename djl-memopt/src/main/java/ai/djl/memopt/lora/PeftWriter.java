package ai.djl.memopt.lora;

import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.Halfs;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import com.google.common.collect.ImmutableList;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.regex.Matcher;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Writes a model's adapters as PEFT 0.21 on transformers 5 will load them into the same outputs (see
 * {@link PeftAdapters#save}).
 */
final class PeftWriter {

    private static final Logger LOG = LoggerFactory.getLogger(PeftAdapters.class);
    /** Names PEFT moves from target_modules to the fused expert parameters on a DeepSeek (qwen2_moe-like) model. */
    private static final Set<String> RENAMED_BY_PEFT = Set.of("gate", "gate_proj", "up_proj", "down_proj");

    private PeftWriter() {}

    static List<String> save(Block root, Path directory, String baseModel) throws IOException {
        Map<String, LoraLinear> adapters = Lora.adapters(root);
        if (adapters.isEmpty()) {
            throw new IllegalStateException("the model has no LoRA adapters to save");
        }
        LoraTargets.View view = new LoraTargets.View(root);
        List<String> warnings = new ArrayList<>();
        LoraLinear first = adapters.values().iterator().next();
        List<LoraTargets.Target> targets = targets(adapters, view);
        SafetensorsWriter writer = new SafetensorsWriter().putMetadata("format", "pt");
        List<PeftLayout.Unit> units = new ArrayList<>();
        boolean parameters = false;
        try (NDManager scope = first.loraA().getArray().getManager().newSubManager()) {
            for (PeftLayout.Unit u : PeftLayout.units(view, targets)) {
                if (u.fused()) {
                    units.add(writeFused(u, adapters, view, root, writer, scope, warnings));
                } else {
                    LoraLinear l = adapters.get(u.paths.get(0));
                    writer.add(u.nameA(), l.loraA().getArray());
                    writer.add(u.nameB(), l.loraB().getArray());
                    units.add(u);
                }
                parameters |= u.kind != PeftLayout.Kind.MODULE;
            }
            float dropout = dropout(adapters, parameters, warnings);
            JsonObject config = configJson(units, view, first.useRslora(), dropout, baseModel);
            if (Files.exists(directory) && !Files.isDirectory(directory)) {
                throw new IOException(directory + " exists and is not a directory");
            }
            Files.createDirectories(directory);
            writer.write(directory.resolve(PeftAdapters.WEIGHTS_FILE));
            AtomicFiles.writeString(directory.resolve(PeftAdapters.CONFIG_FILE),
                    new GsonBuilder().setPrettyPrinting().serializeNulls().create().toJson(config) + "\n");
        }
        for (String w : warnings) {
            LOG.warn("{}: {}", directory, w);
        }
        return ImmutableList.copyOf(warnings);
    }

    /** The model's adapters as targets under the keys PEFT knows them by. */
    private static List<LoraTargets.Target> targets(Map<String, LoraLinear> adapters, LoraTargets.View view) {
        LoraLinear first = adapters.values().iterator().next();
        List<LoraTargets.Target> targets = new ArrayList<>();
        for (Map.Entry<String, LoraLinear> e : adapters.entrySet()) {
            LoraLinear l = e.getValue();
            if (l.useRslora() != first.useRslora()) {
                throw new IllegalArgumentException("adapters differ: '" + adapters.keySet().iterator().next()
                        + "' is " + first + " but '" + e.getKey() + "' is " + l + "; PEFT's use_rslora is one setting"
                        + " for the whole adapter");
            }
            targets.add(new LoraTargets.Target(e.getKey(), keyOf(e.getKey(), view), l.rank(), l.alpha()));
        }
        return targets;
    }

    /**
     * The names PEFT will report for the saved adapter ({@code targeted_module_names} and
     * {@code targeted_parameter_names}): module paths, {@code <path>.weight} and fused expert parameter keys.
     */
    static List<String> peftKeys(Block root) {
        LoraTargets.View view = new LoraTargets.View(root);
        List<String> out = new ArrayList<>();
        for (PeftLayout.Unit u : PeftLayout.units(view, targets(Lora.adapters(root), view))) {
            out.add(u.key);
        }
        return out;
    }

    /**
     * The key PEFT knows an adapted projection by: the fused parameter for a routed expert, {@code <path>.weight} for
     * a name PEFT would move from target_modules to the routed experts (dense MLP, shared experts), else the path.
     */
    private static String keyOf(String path, LoraTargets.View view) {
        Matcher m = LoraTargets.ROUTED.matcher(path);
        if (m.matches() && view.groups.containsKey(m.group(1))) {
            return m.group(1) + (m.group(3).equals("down_proj") ? ".down_proj" : ".gate_up_proj");
        }
        return RENAMED_BY_PEFT.contains(path.substring(path.lastIndexOf('.') + 1)) ? path + ".weight" : path;
    }

    /** Writes a fused parameter's tensors; returns the unit with the rank and alpha written. */
    private static PeftLayout.Unit writeFused(PeftLayout.Unit u, Map<String, LoraLinear> adapters,
            LoraTargets.View view, Block root, SafetensorsWriter writer, NDManager scope, List<String> warnings) {
        List<FusedExperts.Part[]> parts = new ArrayList<>();
        LoraLinear reference = null;
        String referencePath = null;
        boolean half = true;
        for (int e = 0; e < u.experts; e++) {
            List<String> paths = u.expertPaths(e);
            FusedExperts.Part[] p = new FusedExperts.Part[paths.size()];
            for (int i = 0; i < p.length; i++) {
                LoraLinear l = adapters.get(paths.get(i));
                if (l == null) {
                    long[] f = PeftLayout.features(view.modules.get(paths.get(i)), paths.get(i), root);
                    p[i] = FusedExperts.Part.none(f[0], f[1]);
                    continue;
                }
                if (reference == null) {
                    reference = l;
                    referencePath = paths.get(i);
                } else if (Float.compare(l.scale(), reference.scale()) != 0) {
                    throw new IllegalArgumentException("PEFT gives every routed expert of '" + u.key + "' one LoRA "
                            + "scale (alpha / r), but '" + referencePath + "' is " + reference + " and '"
                            + paths.get(i) + "' is " + l + ": nothing written");
                }
                half &= l.loraA().getArray().getDataType() == DataType.FLOAT16
                        && l.loraB().getArray().getDataType() == DataType.FLOAT16;
                p[i] = FusedExperts.Part.of(l, scope);
            }
            parts.add(p);
        }
        FusedExperts.Fused fused = FusedExperts.fuse(parts);
        Set<Integer> ranks = new java.util.TreeSet<>();
        parts.forEach(p -> java.util.Arrays.stream(p).forEach(q -> ranks.add(q.rank)));
        if (ranks.size() > 1) {
            warnings.add("the routed experts' adapters under '" + u.key + "' have ranks " + ranks + " (0: none): "
                    + "PEFT has one rank per fused parameter, so they are written as one rank-" + fused.rank
                    + " adapter padded with zeros (the same outputs; loaded back, every expert gets rank "
                    + fused.rank + ")");
        }
        long[][] shapes = PeftLayout.shapes(new PeftLayout.Unit(u.kind, u.key, u.prefix, u.paths, u.experts,
                fused.rank, 1), view.modules, root);
        add(writer, u.nameA(), shapes[0], fused.a, half);
        add(writer, u.nameB(), shapes[1], fused.b, half);
        double ratio = (double) fused.rank / reference.rank();
        float alpha = (float) (reference.alpha() * (reference.useRslora() ? Math.sqrt(ratio) : ratio));
        return new PeftLayout.Unit(u.kind, u.key, u.prefix, u.paths, u.experts, fused.rank, alpha);
    }

    private static void add(SafetensorsWriter writer, String name, long[] shape, float[] values, boolean half) {
        ByteBuffer bytes = ByteBuffer.allocate(values.length * (half ? 2 : 4)).order(ByteOrder.LITTLE_ENDIAN);
        for (float v : values) {
            if (half) {
                bytes.putShort(Halfs.floatToF16(v));
            } else {
                bytes.putFloat(v);
            }
        }
        writer.add(name, half ? SafetensorsDType.F16 : SafetensorsDType.F32, shape, bytes.flip());
    }

    /** PEFT has one lora_dropout, and its parameter wrappers refuse any but 0. */
    private static float dropout(Map<String, LoraLinear> adapters, boolean parameters, List<String> warnings) {
        float max = 0;
        Set<Float> seen = new LinkedHashSet<>();
        for (LoraLinear l : adapters.values()) {
            max = Math.max(max, l.dropout());
            seen.add(l.dropout());
        }
        if (parameters && max > 0) {
            warnings.add("lora_dropout " + max + " written as 0: PEFT refuses dropout on target_parameters (used here "
                    + "for the MLP and expert projections); dropout only acts while training, so the adapted model's "
                    + "outputs are the same");
            return 0;
        }
        if (seen.size() > 1) {
            warnings.add("adapters differ in dropout " + seen + "; PEFT has one lora_dropout: " + max
                    + " written (dropout only acts while training)");
        }
        return max;
    }

    private static JsonObject configJson(List<PeftLayout.Unit> units, LoraTargets.View view, boolean rslora,
            float dropout, String baseModel) {
        // the most common (r, alpha) is the default; the others go to rank_pattern / alpha_pattern
        Map<String, Integer> counts = new HashMap<>();
        PeftLayout.Unit common = units.get(0);
        for (PeftLayout.Unit u : units) {
            int n = counts.merge(u.rank + "/" + u.alpha, 1, Integer::sum);
            if (n > counts.get(common.rank + "/" + common.alpha)) {
                common = u;
            }
        }
        List<String> allKeys = new ArrayList<>();
        List<String> modules = new ArrayList<>();
        List<String> parameters = new ArrayList<>();
        Map<Integer, List<String>> byRank = new LinkedHashMap<>();
        Map<Float, List<String>> byAlpha = new LinkedHashMap<>();
        for (PeftLayout.Unit u : units) {
            allKeys.add(u.key);
            (u.kind == PeftLayout.Kind.MODULE ? modules : parameters).add(u.key);
            if (u.rank != common.rank) {
                byRank.computeIfAbsent(u.rank, k -> new ArrayList<>()).add(u.key);
            }
            if (Float.compare(u.alpha, common.alpha) != 0) {
                byAlpha.computeIfAbsent(u.alpha, k -> new ArrayList<>()).add(u.key);
            }
        }
        JsonObject rankPattern = new JsonObject();
        byRank.forEach((r, keys) -> minimalSuffixes(keys, allKeys).forEach(s -> rankPattern.addProperty(escape(s), r)));
        JsonObject alphaPattern = new JsonObject();
        byAlpha.forEach((a, keys) -> minimalSuffixes(keys, allKeys)
                .forEach(s -> alphaPattern.add(escape(s), number(a))));

        JsonObject c = new JsonObject();
        c.add("alpha_pattern", alphaPattern);
        c.add("auto_mapping", JsonNull.INSTANCE);
        c.add("base_model_name_or_path", baseModel == null ? JsonNull.INSTANCE : new JsonPrimitive(baseModel));
        c.addProperty("bias", "none");
        c.add("exclude_modules", JsonNull.INSTANCE);
        c.addProperty("fan_in_fan_out", false);
        c.addProperty("inference_mode", true);
        c.addProperty("init_lora_weights", true);
        c.add("layers_pattern", JsonNull.INSTANCE);
        c.add("layers_to_transform", JsonNull.INSTANCE);
        c.add("loftq_config", new JsonObject());
        c.add("lora_alpha", number(common.alpha));
        c.addProperty("lora_bias", false);
        c.add("lora_dropout", number(dropout));
        c.add("megatron_config", JsonNull.INSTANCE);
        c.addProperty("megatron_core", "megatron.core");
        c.add("modules_to_save", JsonNull.INSTANCE);
        c.addProperty("peft_type", "LORA");
        c.addProperty("r", common.rank);
        c.add("rank_pattern", rankPattern);
        c.add("revision", JsonNull.INSTANCE);
        c.add("target_modules", strings(minimalSuffixes(modules, view.visible)));
        c.add("target_parameters", strings(minimalSuffixes(parameters, view.parameterKeys.keySet())));
        c.addProperty("task_type", "CAUSAL_LM");
        c.addProperty("use_dora", false);
        c.addProperty("use_rslora", rslora);
        return c;
    }

    /**
     * The shortest dotted tails that select exactly {@code selected} among {@code universe} under PEFT's list rule
     * (a name matches a key equal to it or ending with {@code "." + name}), so that {@code q_a_proj} stands for every
     * layer's attention projection, and {@code model.layers.1.self_attn.q_a_proj} for one.
     */
    static List<String> minimalSuffixes(Collection<String> selected, Collection<String> universe) {
        Set<String> chosen = new LinkedHashSet<>();
        Set<String> wanted = new LinkedHashSet<>(selected);
        for (String key : selected) {
            if (chosen.stream().anyMatch(s -> matches(s, key))) {
                continue;
            }
            String[] parts = key.split("\\.");
            for (int k = 1; k <= parts.length; k++) {
                if (k < parts.length && parts[parts.length - k].chars().allMatch(Character::isDigit)) {
                    continue; // "layers.1.self_attn.o_proj" rather than "1.self_attn.o_proj"
                }
                String suffix = String.join(".", java.util.Arrays.copyOfRange(parts, parts.length - k, parts.length));
                boolean exact = true;
                for (String u : universe) {
                    if (matches(suffix, u) && !wanted.contains(u)) {
                        exact = false;
                        break;
                    }
                }
                if (exact || k == parts.length) {
                    chosen.add(suffix);
                    break;
                }
            }
        }
        return new ArrayList<>(chosen);
    }

    private static boolean matches(String name, String key) {
        return key.equals(name) || key.endsWith("." + name);
    }

    /** Escapes for both Python's {@code re} and Java (a backslash before every character but [A-Za-z0-9_]). */
    static String escape(String s) {
        StringBuilder b = new StringBuilder();
        for (char ch : s.toCharArray()) {
            if (!(Character.isLetterOrDigit(ch) && ch < 128) && ch != '_') {
                b.append('\\');
            }
            b.append(ch);
        }
        return b.toString();
    }

    static JsonPrimitive number(float v) {
        return v == Math.rint(v) && Math.abs(v) < 1e9 ? new JsonPrimitive((long) v) : new JsonPrimitive(v);
    }

    private static JsonElement strings(List<String> values) {
        JsonArray a = new JsonArray();
        values.forEach(a::add);
        return a;
    }
}
