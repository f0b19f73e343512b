package ai.djl.memopt.lora;

import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.training.ParameterStore;
import com.google.common.collect.ImmutableList;
import com.google.common.collect.ImmutableMap;
import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The LoRA entry point: put adapters on a model's projections, train only them, save and load them in Hugging Face
 * PEFT's layout, and fold them back into the weights.
 *
 * <pre>{@code
 * LoraReport report = Lora.apply(model, LoraConfig.builder().setRank(8).optTargetModules("q_a_proj", "o_proj").build());
 * // ... train: only lora_A / lora_B receive gradients and optimizer updates
 * Lora.save(model, Path.of("my-adapter"));      // adapter_model.safetensors + adapter_config.json, as PEFT writes them
 * Lora.merge(model);                            // W += scale * B A; the projections are plain Linear blocks again
 * }</pre>
 *
 * <p>Module paths are {@link Blocks} paths: DJL's ordering prefixes stripped, so on the DeepSeek model they read like
 * Hugging Face module names ({@code model.layers.0.self_attn.q_a_proj}).
 */
public final class Lora {

    private Lora() {}

    /**
     * Wraps every projection the config targets in a {@link LoraLinear}, in place, and freezes every other parameter
     * of the tree (adapters added by an earlier call stay trainable), so only adapter weights receive gradients (DJL's optimizers skip parameters that do not require
     * gradients). Adapter weights live with the base weights (same manager and device).
     *
     * @throws IllegalArgumentException if nothing matches, a match is not a projection or already has an adapter
     */
    public static LoraReport apply(Block root, LoraConfig config) {
        return apply(root, config, null);
    }

    /**
     * As {@link #apply(Block, LoraConfig)}, with the adapter weights owned by {@code manager} (null: the manager of
     * each base weight).
     */
    public static LoraReport apply(Block root, LoraConfig config, NDManager manager) {
        List<String> targets = targets(root, config);
        root.freezeParameters(true);
        for (String path : targets) {
            Blocks.replace(root, path, base -> LoraLinear.builder()
                    .setBase(base)
                    .optConfig(config)
                    .optManager(manager != null ? manager : defaultManager(base, root))
                    .build());
        }
        // adapters from an earlier apply stay trainable: the freeze above covered them too
        for (LoraLinear l : adapters(root).values()) {
            l.loraA().freeze(false);
            l.loraB().freeze(false);
        }
        return report(root, targets);
    }

    /**
     * Null for a Linear (its weight's manager is used); for another projection, whose arrays may not be parameters
     * (a quantized block), the manager of its first parameter or else of the model's.
     */
    private static NDManager defaultManager(Block base, Block root) {
        if (base instanceof Linear) {
            return null;
        }
        for (Block b : new Block[] {base, root}) {
            for (Parameter p : b.getParameters().values()) {
                if (p.isInitialized()) {
                    return p.getArray().getManager();
                }
            }
        }
        throw new IllegalArgumentException("cannot tell which NDManager should own adapters for "
                + base.getClass().getName() + ": pass one to Lora.apply(root, config, manager)");
    }

    /**
     * The paths {@link #apply} would wrap, in model order, without changing anything.
     *
     * @throws IllegalArgumentException if nothing matches, or a match is not a Linear / LinearWeightSource or already
     *     has an adapter (the message names the path)
     */
    public static List<String> targets(Block root, LoraConfig config) {
        Map<String, Block> modules = peftModules(root);
        List<String> out = new ArrayList<>();
        for (Map.Entry<String, Block> e : modules.entrySet()) {
            String path = e.getKey();
            if (path.isEmpty() || !config.matches(path)) {
                continue;
            }
            Block block = e.getValue();
            if (block instanceof LoraLinear) {
                throw new IllegalArgumentException("'" + path + "' already has a LoRA adapter; merge or unload it first");
            }
            Block inner = BlockDecorator.unwrap(block);
            if (inner != block && (inner instanceof Linear || inner instanceof LinearWeightSource)) {
                throw new IllegalArgumentException("'" + path + "' is a " + block.getClass().getSimpleName()
                        + " around a projection: apply LoRA before decorating projections (FP16 wrappers), so the "
                        + "decorator wraps the adapter's base instead");
            }
            if (!(block instanceof Linear) && !(block instanceof LinearWeightSource)) {
                throw new IllegalArgumentException("LoRA target " + describeTargets(config) + " matches '" + path
                        + "', a " + block.getClass().getSimpleName()
                        + ", which is not a projection (Linear or LinearWeightSource); narrow the targets");
            }
            out.add(path);
        }
        if (out.isEmpty()) {
            List<String> examples = new ArrayList<>();
            for (Map.Entry<String, Block> e : modules.entrySet()) {
                if ((e.getValue() instanceof Linear || e.getValue() instanceof LinearWeightSource)
                        && examples.size() < 8) {
                    examples.add(e.getKey());
                }
            }
            throw new IllegalArgumentException("no module matches LoRA target " + describeTargets(config)
                    + (config.routedExperts() ? "" : " (routed experts excluded)") + "; projections in the model: "
                    + examples + (examples.size() == 8 ? " ..." : ""));
        }
        return ImmutableList.copyOf(out);
    }

    private static String describeTargets(LoraConfig config) {
        return config.targetRegex() != null ? "regex '" + config.targetRegex() + "'"
                : "modules " + config.targetModules();
    }

    /**
     * The modules of the tree as PEFT sees them: every block by path, with the inside of an adapter hidden (the
     * adapter stands at its base's path).
     */
    static Map<String, Block> peftModules(Block root) {
        Map<String, Block> out = new LinkedHashMap<>();
        String inside = null;
        // Blocks.walk is pre-order: an adapter's own children follow it directly
        for (Map.Entry<String, Block> e : Blocks.walk(root).entrySet()) {
            String path = e.getKey();
            if (inside != null && path.startsWith(inside)) {
                continue;
            }
            inside = e.getValue() instanceof LoraLinear ? (path.isEmpty() ? "" : path + ".") : null;
            out.put(path, e.getValue());
        }
        return out;
    }

    /** Every adapter of the tree by module path, in model order. */
    public static Map<String, LoraLinear> adapters(Block root) {
        ImmutableMap.Builder<String, LoraLinear> out = ImmutableMap.builder();
        for (Map.Entry<String, Block> e : peftModules(root).entrySet()) {
            if (e.getValue() instanceof LoraLinear) {
                out.put(e.getKey(), (LoraLinear) e.getValue());
            }
        }
        return out.build();
    }

    /** Elements of the tree's parameters that require gradients. */
    public static long trainableParameterCount(Block root) {
        long n = 0;
        for (Parameter p : root.getParameters().values()) {
            if (p.requiresGradient() && p.isInitialized()) {
                n += p.getArray().size();
            }
        }
        return n;
    }

    static LoraReport report(Block root, List<String> paths) {
        long total = 0;
        for (Parameter p : root.getParameters().values()) {
            if (p.isInitialized()) {
                total += p.getArray().size();
            }
        }
        // a quantized base's weights are packed arrays, not parameters: count them as the weights they stand for
        for (Block b : Blocks.walk(root).values()) {
            if (b instanceof LinearWeightSource) {
                total += ((LinearWeightSource) b).storedWeightCount();
            }
        }
        return new LoraReport(paths, trainableParameterCount(root), total);
    }

    /**
     * Folds every adapter into its base and removes it: a {@link Linear} base gets {@code W + scale * B A} (summed in
     * FLOAT32, stored in W's type, bias kept) and takes the adapter's place; any other {@link LinearWeightSource}
     * (a quantized base) is replaced by a plain FLOAT32 {@code Linear} holding the merged full-precision weight (and
     * the base's bias, read as its output for a zero input), ready to be quantized again; the base's arrays are
     * released (its {@code close()} if it is {@link AutoCloseable}, else {@link Block#clear()}). Adapter arrays are
     * closed.
     * The merged weights keep the base's frozen state.
     *
     * @return the merged module paths
     */
    public static List<String> merge(Block root) {
        Map<String, LoraLinear> adapters = adapters(root);
        for (Map.Entry<String, LoraLinear> e : adapters.entrySet()) {
            LoraLinear lora = e.getValue();
            Block base = lora.base();
            Block replacement;
            NDManager owner = lora.loraA().getArray().getManager();
            try (NDManager scope = owner.newSubManager()) {
                if (base instanceof Linear) {
                    Parameter wp = base.getParameters().get("weight");
                    NDArray w = wp.getArray(); // (out, in)
                    NDArray merged = lora.merged(w, scope).toType(w.getDataType(), false).stopGradient();
                    // the same Java array keeps the new values, so anything holding the parameter sees them
                    w.intern(merged);
                    w.setRequiresGradient(wp.requiresGradient());
                    replacement = base;
                } else {
                    NDArray w = LoraLinear.baseWeight(base, scope); // (out, in)
                    NDArray merged = lora.merged(w, scope).stopGradient(); // (out, in) FLOAT32
                    NDArray bias = affineOffset(base, lora.inFeatures(), w.getDataType(), scope); // (out) or null
                    Linear linear = Linear.builder().setUnits(lora.outFeatures()).optBias(bias != null).build();
                    merged.attach(owner);
                    linear.getParameters().get("weight").setArray(merged);
                    if (bias != null) {
                        bias.attach(owner);
                        linear.getParameters().get("bias").setArray(bias);
                    }
                    linear.initialize(owner, DataType.FLOAT32, new Shape(lora.inFeatures()));
                    linear.freezeParameters(true);
                    release(base);
                    replacement = linear;
                }
            }
            Blocks.replace(root, e.getKey(), old -> replacement);
            lora.loraA().close();
            lora.loraB().close();
        }
        return ImmutableList.copyOf(adapters.keySet());
    }

    /**
     * The bias of a projection known only as a {@link LinearWeightSource} (whose interface has no bias): its output
     * for a zero input, FLOAT32 {@code (out)}, or null if that is zero. Attached to {@code scope}.
     */
    private static NDArray affineOffset(Block base, long in, DataType type, NDManager scope) {
        NDArray zero = scope.zeros(new Shape(1, in), type); // (1, in)
        NDArray y = base.forward(new ParameterStore(scope, false), new NDList(zero), false).singletonOrThrow();
        y.attach(scope);
        NDArray offset = y.reshape(-1).toType(DataType.FLOAT32, true); // (out)
        offset.attach(scope);
        if (offset.abs().max().getFloat() == 0f) {
            return null;
        }
        return offset;
    }

    /** Frees a replaced projection's arrays: its own {@code close()} if it has one, else its parameters. */
    private static void release(Block base) {
        if (base instanceof AutoCloseable) {
            try {
                ((AutoCloseable) base).close();
            } catch (Exception e) {
                throw new IllegalStateException("cannot close the merged base block " + base, e);
            }
        } else {
            base.clear();
        }
    }

    /**
     * Removes every adapter without merging, giving back the base blocks (PEFT's {@code unload}); adapter arrays are
     * closed. Base parameters stay frozen.
     *
     * @return the module paths that had adapters
     */
    public static List<String> unload(Block root) {
        Map<String, LoraLinear> adapters = adapters(root);
        for (Map.Entry<String, LoraLinear> e : adapters.entrySet()) {
            LoraLinear lora = e.getValue();
            Blocks.replace(root, e.getKey(), old -> lora.base());
            lora.loraA().close();
            lora.loraB().close();
        }
        return ImmutableList.copyOf(adapters.keySet());
    }

    /**
     * Saves the adapters alone in PEFT's layout ({@link PeftAdapters#save}).
     *
     * @throws IOException if writing fails (files already there are left as they were)
     */
    public static void save(Block root, Path directory) throws IOException {
        PeftAdapters.save(root, directory, null);
    }

    /**
     * As {@link #save(Block, Path)}, recording {@code base_model_name_or_path} (a Hugging Face model id or directory)
     * for PEFT's {@code from_pretrained}.
     *
     * @throws IOException if writing fails
     */
    public static void save(Block root, Path directory, String baseModelNameOrPath) throws IOException {
        PeftAdapters.save(root, directory, baseModelNameOrPath);
    }

    /**
     * Loads a PEFT adapter directory onto the model ({@link PeftAdapters#load}).
     *
     * @throws IOException if a file cannot be read
     */
    public static LoraReport load(Block root, Path directory) throws IOException {
        return PeftAdapters.load(root, directory, null);
    }
}
