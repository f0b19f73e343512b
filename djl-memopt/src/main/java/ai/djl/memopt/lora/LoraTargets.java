package ai.djl.memopt.lora;

import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.util.Pair;
import com.google.common.collect.ImmutableList;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Which projections a {@link LoraConfig} adapts in a block tree, decided as PEFT 0.21 decides it on the matching
 * transformers 5 model, so that an adapter moves between the two with the same meaning.
 *
 * <p><b>Routed experts.</b> transformers 5 keeps the routed experts of a DeepSeek MoE layer as one module
 * {@code <...>.experts} with two 3-D parameters: {@code gate_up_proj (E, 2I, H)} (each expert's {@code gate_proj} rows
 * then its {@code up_proj} rows) and {@code down_proj (E, H, I)}. Our model keeps them as separate projections
 * {@code <...>.experts.<n>.gate_proj}; here such a group is seen as PEFT sees it: the container and its two fused
 * parameter keys, and none of the per-expert modules. On a tree with such groups, PEFT's conversion of the config
 * ({@code _convert_peft_config_moe}) is applied first: a {@code target_modules} entry {@code gate_proj},
 * {@code up_proj} or {@code down_proj} (or any entry ending in {@code ".gate_proj"} ...) leaves {@code target_modules}
 * and becomes the {@code target_parameters} entry {@code gate_up_proj} or {@code down_proj}, which matches the fused
 * parameters of every MoE layer; {@code gate_proj} without {@code up_proj} (or the reverse) is an error; a regular
 * expression is first turned into the last components of the paths it matches. So the plain list
 * {@code [..., gate_proj, up_proj, down_proj]} adapts every routed expert and neither the dense MLPs nor the shared
 * experts; those are reached through {@code target_parameters} such as {@code mlp.gate_proj.weight}.
 *
 * <p>A fused {@code gate_up_proj} target puts an adapter of its rank on each expert's {@code gate_proj} and
 * {@code up_proj}; {@code down_proj} on each expert's {@code down_proj}. {@code rank_pattern} and
 * {@code alpha_pattern} are looked up with the module path, or with the parameter key for parameter targets.
 */
final class LoraTargets {

    private static final Logger LOG = LoggerFactory.getLogger(LoraTargets.class);

    /** A routed expert's projection: group (the experts container), expert index, projection. */
    static final Pattern ROUTED = Pattern.compile("(.+\\.experts|experts)\\.([0-9]+)\\.(gate_proj|up_proj|down_proj)");
    /** The fused parameters of a group, in the order PEFT nests their wrappers (registration order: inner first). */
    static final List<String> FUSED = List.of("gate_up_proj", "down_proj");
    /** PEFT's {@code _MOE_TARGET_MODULE_MAPPING} for DeepSeek (qwen2_moe): module name to parameter target. */
    private static final Map<String, String> MOE_RENAMES = new LinkedHashMap<>();

    static {
        MOE_RENAMES.put("gate", "gate.weight");
        MOE_RENAMES.put("gate_proj", "gate_up_proj");
        MOE_RENAMES.put("up_proj", "gate_up_proj");
        MOE_RENAMES.put("down_proj", "down_proj");
    }

    private LoraTargets() {}

    /** One projection to adapt. */
    static final class Target {
        final String path;
        final String key;
        final int rank;
        final float alpha;

        Target(String path, String key, int rank, float alpha) {
            this.path = path;
            this.key = key;
            this.rank = rank;
            this.alpha = alpha;
        }

        /** Whether this is a routed expert's projection reached through a fused parameter key. */
        boolean fused() {
            return !key.equals(path) && !key.equals(path + ".weight");
        }
    }

    /** The tree as PEFT sees it: modules, routed-expert groups and parameter keys. */
    static final class View {
        /** Every module by path (adapters at their base's path), routed experts' own modules included. */
        final Map<String, Block> modules;
        /** Routed-expert groups: container path to number of experts. */
        final Map<String, Integer> groups;
        /** Module paths as transformers has them (without the routed experts' own modules). */
        final List<String> visible;
        /** Parameter keys as transformers has them, each with the module path it belongs to (null for fused). */
        final Map<String, String> parameterKeys;

        View(Block root) {
            modules = Lora.peftModules(root);
            groups = new LinkedHashMap<>();
            for (String path : modules.keySet()) {
                Matcher m = ROUTED.matcher(path);
                if (m.matches()) {
                    groups.merge(m.group(1), Integer.parseInt(m.group(2)) + 1, Math::max);
                }
            }
            visible = new ArrayList<>();
            parameterKeys = new LinkedHashMap<>();
            for (Map.Entry<String, Block> e : modules.entrySet()) {
                String path = e.getKey();
                if (insideGroup(path)) {
                    continue;
                }
                visible.add(path);
                Block b = e.getValue();
                if (groups.containsKey(path)) {
                    for (String f : FUSED) {
                        parameterKeys.put(path + "." + f, null);
                    }
                } else if (isProjection(b)) {
                    parameterKeys.put(path.isEmpty() ? "weight" : path + ".weight", path);
                } else if (!(b instanceof LoraLinear)) {
                    for (Pair<String, Parameter> p : BlockDecorator.unwrap(b).getDirectParameters()) {
                        parameterKeys.put(path.isEmpty() ? p.getKey() : path + "." + p.getKey(), path);
                    }
                }
            }
        }

        boolean insideGroup(String path) {
            for (String g : groups.keySet()) {
                if (path.startsWith(g + ".")) {
                    return true;
                }
            }
            return false;
        }
    }

    static boolean isProjection(Block b) {
        Block inner = BlockDecorator.unwrap(b);
        return b instanceof LoraLinear || inner instanceof Linear || inner instanceof LinearWeightSource;
    }

    /**
     * The targets of {@code config} in {@code root}, in model order.
     *
     * @param existingAllowed whether a target may already carry an adapter (reloading adapter weights)
     * @throws IllegalArgumentException if nothing matches, a match is not a projection, a projection is matched both
     *     as a module and through a parameter, or (with {@code existingAllowed} false) already has an adapter
     */
    static List<Target> resolve(Block root, LoraConfig config, boolean existingAllowed) {
        View view = new View(root);
        LoraConfig c = view.groups.isEmpty() ? config : fuseExpertTargets(config, view);
        Map<String, Target> byPath = new LinkedHashMap<>();
        for (String path : view.visible) {
            if (!path.isEmpty() && c.matches(path)) {
                checkProjection(view.modules.get(path), path, "target_modules " + describe(c), existingAllowed);
                byPath.put(path, new Target(path, path, c.rankFor(path), c.alphaFor(path)));
            }
        }
        for (Map.Entry<String, String> e : view.parameterKeys.entrySet()) {
            String key = e.getKey();
            if (!c.matchesParameter(key)) {
                continue;
            }
            String module = e.getValue();
            if (module == null) { // fused routed-expert parameter
                String group = key.substring(0, key.lastIndexOf('.'));
                boolean gateUp = key.endsWith(".gate_up_proj");
                for (int i = 0; i < view.groups.get(group); i++) {
                    for (String proj : gateUp ? List.of("gate_proj", "up_proj") : List.of("down_proj")) {
                        String path = group + "." + i + "." + proj;
                        Block b = view.modules.get(path);
                        if (b == null) {
                            throw new IllegalArgumentException("target_parameters " + c.targetParameters()
                                    + " match '" + key + "', but expert " + i + " of '" + group + "' has no " + proj);
                        }
                        checkProjection(b, path, "target_parameters " + c.targetParameters(), existingAllowed);
                        byPath.put(path, new Target(path, key, c.rankFor(key), c.alphaFor(key)));
                    }
                }
                continue;
            }
            Block b = view.modules.get(module);
            if (!isProjection(b) || !key.equals(module + ".weight") && !(module.isEmpty() && key.equals("weight"))) {
                throw new IllegalArgumentException("target_parameters " + c.targetParameters() + " match '" + key
                        + "', which is not the weight of a projection (Linear or LinearWeightSource) but of a "
                        + b.getClass().getSimpleName() + (key.endsWith(".gate.weight") ? " (the MoE router: PEFT turns "
                        + "the target name 'gate' into 'gate.weight'; LoRA on the router is not supported)" : "")
                        + "; narrow the targets");
            }
            if (byPath.containsKey(module)) {
                throw new IllegalArgumentException("'" + module + "' is targeted both by target_modules "
                        + describe(c) + " and by target_parameters " + c.targetParameters() + " ('" + key
                        + "'); PEFT refuses this too: target it one way");
            }
            checkProjection(b, module, "target_parameters " + c.targetParameters(), existingAllowed);
            byPath.put(module, new Target(module, key, c.rankFor(key), c.alphaFor(key)));
        }
        if (byPath.isEmpty()) {
            List<String> examples = new ArrayList<>();
            for (String path : view.visible) {
                if (isProjection(view.modules.get(path)) && examples.size() < 8) {
                    examples.add(path);
                }
            }
            for (String g : view.groups.keySet()) {
                if (examples.size() < 10) {
                    examples.add(g + ".gate_up_proj (parameter)");
                }
            }
            throw new IllegalArgumentException("no module matches LoRA target " + describe(c)
                    + (c.targetParameters().isEmpty() ? "" : " or parameters " + c.targetParameters())
                    + "; projections in the model: " + examples + (examples.size() >= 8 ? " ..." : "")
                    + "; layer types seen: " + BlockTrees.describeTypes(seenBlocks(view)));
        }
        List<Target> out = new ArrayList<>();
        for (String path : view.modules.keySet()) {
            Target t = byPath.get(path);
            if (t != null) {
                out.add(t);
            }
        }
        return ImmutableList.copyOf(out);
    }

    private static void checkProjection(Block block, String path, String what, boolean existingAllowed) {
        if (block instanceof LoraLinear) {
            if (existingAllowed) {
                return;
            }
            throw new IllegalArgumentException("'" + path + "' already has a LoRA adapter; merge or unload it first");
        }
        Block inner = BlockDecorator.unwrap(block);
        if (inner != block && (inner instanceof Linear || inner instanceof LinearWeightSource)) {
            throw new IllegalArgumentException("'" + path + "' is a " + block.getClass().getSimpleName()
                    + " around a projection: apply LoRA before decorating projections (FP16 wrappers), so the "
                    + "decorator wraps the adapter's base instead");
        }
        if (!(block instanceof Linear) && !(block instanceof LinearWeightSource)) {
            throw new IllegalArgumentException("LoRA " + what + " matches '" + path + "', a "
                    + block.getClass().getSimpleName()
                    + ", which is not a projection (Linear or LinearWeightSource); narrow the targets");
        }
    }

    static String describe(LoraConfig config) {
        return config.targetRegex() != null ? "regex '" + config.targetRegex() + "'"
                : "modules " + config.targetModules();
    }

    /**
     * PEFT's {@code _convert_peft_config_moe} for a tree with routed-expert groups: expert projection names move from
     * {@code target_modules} to {@code target_parameters}. Ranks are left alone: PEFT also doubles the rank and alpha
     * of a fused {@code gate_up_proj} converted from separate {@code gate_proj}/{@code up_proj} adapters, which are
     * exactly what is built here (an adapter of the config's rank on each of {@code gate_proj} and {@code up_proj}).
     *
     * @throws IllegalArgumentException for {@code gate_proj} without {@code up_proj} or the reverse
     */
    static LoraConfig fuseExpertTargets(LoraConfig config, View view) {
        Set<String> names;
        if (config.targetRegex() != null) {
            names = resolveRegex(config, view);
            if (names.isEmpty()) {
                return config; // nothing matches: the caller says so
            }
            LOG.warn("LoRA target regex '{}' is read as PEFT 0.21 reads it on a model with routed experts: as the "
                    + "names {} (every module ending so); list whole paths to single out modules", config.targetRegex(),
                    names);
        } else {
            names = new LinkedHashSet<>(config.targetModules());
        }
        List<String> modules = new ArrayList<>();
        Set<String> parameters = new LinkedHashSet<>(config.targetParameters());
        Set<String> fusedFrom = new LinkedHashSet<>();
        for (String t : names) {
            String renamed = null;
            for (Map.Entry<String, String> r : MOE_RENAMES.entrySet()) {
                if (t.equals(r.getKey()) || t.endsWith("." + r.getKey())) {
                    renamed = r.getValue();
                    if (renamed.equals("gate_up_proj")) {
                        fusedFrom.add(r.getKey());
                    }
                    break;
                }
            }
            if (renamed == null) {
                modules.add(t);
            } else {
                parameters.add(renamed);
            }
        }
        if (fusedFrom.size() == 1) {
            String present = fusedFrom.iterator().next();
            String missing = present.equals("gate_proj") ? "up_proj" : "gate_proj";
            throw new IllegalArgumentException("LoRA target " + present + " without " + missing + ": transformers 5 "
                    + "fuses each routed expert's gate_proj and up_proj into one gate_up_proj parameter, and a "
                    + "target_modules name " + present + " means that parameter (PEFT refuses this list the same way); "
                    + "add " + missing + ", or target the dense MLP and shared experts through target parameters "
                    + "such as 'mlp." + present + ".weight' and 'shared_experts." + present + ".weight'");
        }
        if (modules.size() == names.size() && config.targetRegex() == null) {
            return config;
        }
        LoraConfig.Builder b = config.toBuilder().optTargetRegex(null).optTargetModules(modules)
                .optTargetParameters(new ArrayList<>(parameters));
        return b.build();
    }

    /**
     * PEFT's {@code _resolve_string_target_modules}: the last components of the (visible) module paths the regex
     * matches, plus {@code gate_proj}/{@code up_proj}/{@code down_proj} if it matches {@code <group>.<name>}.
     */
    private static Set<String> resolveRegex(LoraConfig config, View view) {
        Set<String> out = new LinkedHashSet<>();
        for (String path : view.visible) {
            if (!path.isEmpty() && config.matches(path)) {
                out.add(path.substring(path.lastIndexOf('.') + 1));
            }
        }
        for (String old : List.of("gate_proj", "up_proj", "down_proj")) {
            for (String g : view.groups.keySet()) {
                if (!out.contains(old) && config.matches(g + "." + old)) {
                    out.add(old);
                }
            }
        }
        return out;
    }

    private static List<Block> seenBlocks(View view) {
        List<Block> seen = new ArrayList<>();
        view.modules.forEach((path, block) -> {
            if (!path.isEmpty()) {
                seen.add(block);
            }
        });
        return seen;
    }
}
