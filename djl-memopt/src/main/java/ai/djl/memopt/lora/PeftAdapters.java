package ai.djl.memopt.lora;

import ai.djl.ndarray.NDManager;
import ai.djl.nn.Block;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.file.Path;
import java.util.List;

/**
 * LoRA adapters on disk in Hugging Face PEFT's layout, which {@code PeftModel.from_pretrained} loads and writes, with
 * the meaning PEFT 0.21 gives them on a transformers 5 model:
 * <ul>
 *   <li>{@code adapter_model.safetensors}: for every adapted module or 2-D parameter {@code <path>},
 *       {@code base_model.model.<path>.lora_A.weight} {@code (r, in)} and {@code ...lora_B.weight} {@code (out, r)}
 *       (PEFT drops the adapter name {@code default} when saving); for the routed experts of a MoE layer, PEFT's
 *       fused form on {@code <...>.mlp.experts} ({@code gate_up_proj} under {@code experts.base_layer} when
 *       {@code down_proj} is adapted too; {@code lora_A (E*r, in)}, {@code lora_B (out, r*E)}, see
 *       {@link PeftLayout} and {@link FusedExperts}), mapped exactly onto our per-expert projections;</li>
 *   <li>{@code adapter_config.json}: {@code peft_type: LORA}, {@code r}, {@code lora_alpha}, {@code target_modules},
 *       {@code target_parameters}, {@code rank_pattern}, {@code alpha_pattern} and PEFT's other fields.</li>
 * </ul>
 * Module paths are those of the model block tree ({@code model.layers.0.self_attn.q_a_proj} on the DeepSeek model,
 * equal to transformers' module names). Which projections a config adapts is decided as PEFT decides it
 * ({@link Lora#targets}). Features PEFT can describe but this package does not implement (DoRA,
 * {@code modules_to_save}, bias training, fan-in-fan-out weights, ...) are refused with an error naming the field,
 * never silently ignored.
 *
 * <pre>{@code
 * List<String> warnings = PeftAdapters.save(model, dir, "deepseek-ai/DeepSeek-V2-Lite");
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

    private PeftAdapters() {}

    /**
     * Writes the adapters of {@code root} to {@code directory} (created if needed), each file atomically, so that
     * PEFT 0.21 loads them on the transformers 5 model into the same outputs:
     * <ul>
     *   <li>attention (and any other) projections go to {@code target_modules}, as the shortest names that select
     *       exactly them ({@code q_a_proj} for every layer's, {@code model.layers.1.self_attn.q_a_proj} for one);</li>
     *   <li>projections named {@code gate_proj}, {@code up_proj}, {@code down_proj} outside the routed experts (the
     *       dense MLPs, the shared experts) go to {@code target_parameters} as {@code <path>.weight}: PEFT turns these
     *       names in {@code target_modules} into the fused routed experts;</li>
     *   <li>routed experts are written in PEFT's fused-parameter form ({@code target_parameters}
     *       {@code gate_up_proj} / {@code down_proj}); separate gate and up adapters become one block-diagonal
     *       adapter of twice the rank (the expert without an adapter, or of a lower rank, gets zeros: exact);</li>
     *   <li>ranks and alphas that differ from the most common ones go to {@code rank_pattern} /
     *       {@code alpha_pattern}.</li>
     * </ul>
     * What PEFT cannot express is refused before anything is written (adapters that differ in rsLoRA; routed experts
     * of one fused parameter with different scales). Where the file differs from the model without changing its
     * outputs, a warning says what was written (also logged): dropout, which PEFT refuses on parameter targets, is
     * written as 0; adapters with different dropouts get the largest.
     *
     * @param baseModelNameOrPath written as {@code base_model_name_or_path} (may be null)
     * @return the warnings (empty when the file says exactly what the model has)
     * @throws IllegalStateException if the model has no adapters
     * @throws IllegalArgumentException if PEFT cannot express the adapters (nothing is written)
     * @throws IOException if writing fails
     */
    public static List<String> save(Block root, Path directory, String baseModelNameOrPath) throws IOException {
        return PeftWriter.save(root, directory, baseModelNameOrPath);
    }

    /**
     * Reads {@code adapter_config.json} into a {@link LoraConfig}.
     *
     * @throws IllegalArgumentException naming the file and field for a missing or unsupported setting
     * @throws IOException if the file cannot be read
     */
    public static LoraConfig readConfig(Path directory) throws IOException {
        return PeftReader.readConfig(directory);
    }

    /**
     * Converts a PEFT {@code adapter_config.json} object.
     *
     * @param source names the origin in error messages
     */
    public static LoraConfig configFromJson(JsonObject json, String source) {
        return PeftReader.configFromJson(json, source);
    }

    /**
     * Loads a PEFT adapter directory onto {@code root}. If the model has no adapters yet, they are created where
     * {@code adapter_config.json} targets ({@link Lora#apply}, everything else frozen); if it has, they must be exactly
     * the adapted modules of the file, with the file's ranks and alphas, and their weights are overwritten. Fused
     * routed-expert tensors are split onto each expert's {@code gate_proj}, {@code up_proj} and {@code down_proj}
     * adapters (of the fused rank; gate and up get the same {@code lora_A}). Everything is validated before the model
     * is touched: tensor names, that each target has both tensors and each tensor a target, and shapes.
     *
     * @param manager owns new adapter weights (null: the base weights' managers)
     * @throws IllegalArgumentException naming the file and tensor or field at fault
     * @throws IOException if a file cannot be read
     */
    public static LoraReport load(Block root, Path directory, NDManager manager) throws IOException {
        return PeftReader.load(root, directory, manager);
    }
}
