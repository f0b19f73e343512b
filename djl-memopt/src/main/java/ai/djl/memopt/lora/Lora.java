package ai.djl.memopt.lora;

import ai.djl.memopt.nn.BlockSite;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.memopt.nn.StackableProjection;
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
import java.util.HashMap;
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
 * Hugging Face module names ({@code model.layers.0.self_attn.q_a_proj}). Projections are found through
 * {@link Blocks#sites}: an adapter goes around the projection itself, inside checkpointing or mixed-precision
 * decorators applied before, which gives the same model as applying LoRA first.
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
        List<LoraTargets.Target> targets = LoraTargets.resolve(root, config, false);
        Map<String, LoraLinear> earlier = adapters(root);
        root.freezeParameters(true);
        // adapters from an earlier apply stay trainable (unfrozen before the new ones go in, so that a mixed-precision
        // decorator above, told of each replacement, sees the final trainable set)
        for (LoraLinear l : earlier.values()) {
            l.loraA().freeze(false);
            l.loraB().freeze(false);
        }
        Map<String, LoraConfig> variants = new HashMap<>(); // one config per (rank, alpha) for the builders
        List<String> paths = new ArrayList<>(targets.size());
        for (LoraTargets.Target t : targets) {
            LoraConfig variant = variants.computeIfAbsent(t.rank + "/" + t.alpha, k -> t.rank == config.rank()
                    && Float.compare(t.alpha, config.alpha()) == 0 ? config
                    : config.toBuilder().setRank(t.rank).optAlpha(t.alpha).build());
            Blocks.replace(root, t.path, base -> LoraLinear.builder()
                    .setBase(base)
                    .optConfig(variant)
                    .optManager(manager != null ? manager : defaultManager(base, root))
                    .build());
            paths.add(t.path);
        }
        return report(root, paths);
    }

    /**
     * Null for a Linear (its weight's manager is used); for another projection, whose arrays may not be parameters
     * (a quantized block), the manager of its first parameter or else of the model's, or else (a model without float
     * parameters) the manager of the projection's quantized arrays.
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
        StackableProjection arrays = StackableProjection.of(base);
        if (arrays != null) {
            // a model without float parameters (every layer quantized): the manager of the layer's codes
            return arrays.weightArrays().get(0).getManager();
        }
        throw new IllegalArgumentException("cannot tell which NDManager should own adapters for "
                + base.getClass().getName() + ": pass one to Lora.apply(root, config, manager)");
    }

    /**
     * The paths {@link #apply} would wrap, in model order, without changing anything. Targets are chosen as PEFT 0.21
     * chooses them on the matching transformers 5 model ({@link LoraConfig} explains the rules): on a model with routed
     * MoE experts, the names {@code gate_proj}, {@code up_proj} and {@code down_proj} in {@code target_modules} mean
     * every routed expert's projections, never the dense MLP or the shared experts (reach those with
     * {@code target_parameters} such as {@code mlp.gate_proj.weight}).
     *
     * @throws IllegalArgumentException if nothing matches (the message names the projections and the layer types
     *     seen), a match is not a Linear / LinearWeightSource or already has an adapter, or the targets are ones PEFT
     *     refuses (the message names the path or target)
     */
    public static List<String> targets(Block root, LoraConfig config) {
        List<String> out = new ArrayList<>();
        for (LoraTargets.Target t : LoraTargets.resolve(root, config, false)) {
            out.add(t.path);
        }
        return ImmutableList.copyOf(out);
    }

    /**
     * The modules of the tree as PEFT sees them: every block by path, seen through decorators, with the inside of an
     * adapter hidden (the adapter stands at its base's path).
     */
    static Map<String, Block> peftModules(Block root) {
        Map<String, Block> out = new LinkedHashMap<>();
        for (BlockSite site : Blocks.sites(root).values()) {
            out.put(site.path(), site.wrapper(LoraLinear.class).map(Block.class::cast).orElse(site.core()));
        }
        return out;
    }

    /** Every adapter of the tree by module path, in model order. */
    public static Map<String, LoraLinear> adapters(Block root) {
        ImmutableMap.Builder<String, LoraLinear> out = ImmutableMap.builder();
        for (BlockSite site : Blocks.sites(root).values()) {
            site.wrapper(LoraLinear.class).ifPresent(l -> out.put(site.path(), l));
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
            Blocks.site(root, e.getKey()).replaceWrapper(lora, replacement);
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
            Blocks.site(root, e.getKey()).replaceWrapper(lora, lora.base());
            lora.loraA().close();
            lora.loraB().close();
        }
        return ImmutableList.copyOf(adapters.keySet());
    }

    /**
     * Saves the adapters alone in PEFT's layout ({@link PeftAdapters#save}).
     *
     * @return warnings about what the files say differently from the model without changing its outputs
     * @throws IOException if writing fails (files already there are left as they were)
     */
    public static List<String> save(Block root, Path directory) throws IOException {
        return PeftAdapters.save(root, directory, null);
    }

    /**
     * As {@link #save(Block, Path)}, recording {@code base_model_name_or_path} (a Hugging Face model id or directory)
     * for PEFT's {@code from_pretrained}.
     *
     * @return warnings, as {@link #save(Block, Path)}
     * @throws IOException if writing fails
     */
    public static List<String> save(Block root, Path directory, String baseModelNameOrPath) throws IOException {
        return PeftAdapters.save(root, directory, baseModelNameOrPath);
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
