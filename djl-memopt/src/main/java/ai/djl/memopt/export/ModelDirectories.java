package ai.djl.memopt.export;

import ai.djl.Device;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.PeftAdapters;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonElement;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;

/**
 * Opens any DeepSeek model directory this project reads or writes: a Hugging Face checkpoint directory
 * ({@code config.json} + safetensors, BF16/F16/F32) or a quantized artifact written by {@link QuantizedArtifact}
 * (recognised by its {@code quantization.json}). Every tool that takes {@code --model DIR} goes through here, so an
 * artifact works wherever a model directory does.
 *
 * <pre>{@code
 * DeepSeekForCausalLM lm = ModelDirectories.loadDeepSeek(Path.of("out/int4"), manager, DataType.FLOAT32);
 * }</pre>
 */
public final class ModelDirectories {

    private ModelDirectories() {}

    /** Whether {@code dir} is a quantized artifact rather than a plain checkpoint directory. */
    public static boolean isQuantizedArtifact(Path dir) {
        return Files.isRegularFile(dir.resolve(QuantizedArtifact.METADATA));
    }

    /** Whether {@code dir} holds a LoRA adapter in PEFT's layout rather than a model. */
    public static boolean isAdapter(Path dir) {
        return Files.isRegularFile(dir.resolve(PeftAdapters.CONFIG_FILE)) && !Files.isRegularFile(
                dir.resolve("config.json"));
    }

    /**
     * Loads a DeepSeek model from a checkpoint directory or a quantized artifact (checksums verified).
     *
     * @param dtype FLOAT32 or FLOAT16: the type of the (unquantized) weights and of the computation
     * @throws IOException naming the file and what is wrong, for a missing, corrupt or mismatched directory, and for
     *     a LoRA adapter directory (saying what to load instead)
     */
    public static DeepSeekForCausalLM loadDeepSeek(Path dir, NDManager manager, DataType dtype) throws IOException {
        if (!Files.isDirectory(dir)) {
            throw new IOException(dir + ": not a model directory");
        }
        if (isAdapter(dir)) {
            throw new IOException(dir + " is a LoRA adapter (" + PeftAdapters.CONFIG_FILE + "), not a model: load "
                    + "the merged model (" + dir.resolve("merged") + ", written by memopt finetune --merge), or the "
                    + "base model with the adapter on it (memopt: --model BASE --adapter " + dir + "; Java: "
                    + "loadDeepSeek(base, manager, dtype, adapter))" + baseOf(dir));
        }
        return isQuantizedArtifact(dir)
                ? QuantizedArtifact.loadDeepSeek(dir, manager, dtype)
                : DeepSeekLoader.load(dir, manager, dtype);
    }

    /**
     * As {@link #loadDeepSeek(Path, NDManager, DataType)}, with the weights on a manager of {@code device} that the
     * model owns: closing the model frees them.
     */
    public static DeepSeekForCausalLM loadDeepSeek(Path dir, Device device, DataType dtype) throws IOException {
        NDManager manager = NDManager.newBaseManager(device);
        try {
            DeepSeekForCausalLM lm = loadDeepSeek(dir, manager, dtype);
            lm.ownManager();
            return lm;
        } catch (IOException | RuntimeException e) {
            manager.close();
            throw e;
        }
    }

    /**
     * Loads a DeepSeek model and puts a LoRA adapter (PEFT layout, as {@code memopt finetune --lora-rank} writes it)
     * on it, unmerged: on a quantized artifact the adapters run beside the quantized layers (QLoRA inference), so the
     * base stays quantized.
     *
     * @param adapter the adapter directory, or null for none
     */
    public static DeepSeekForCausalLM loadDeepSeek(Path dir, NDManager manager, DataType dtype, Path adapter)
            throws IOException {
        DeepSeekForCausalLM lm = loadDeepSeek(dir, manager, dtype);
        if (adapter != null) {
            if (!Files.isRegularFile(adapter.resolve(PeftAdapters.CONFIG_FILE))) {
                throw new IOException(adapter + ": not a LoRA adapter directory (no " + PeftAdapters.CONFIG_FILE
                        + ")");
            }
            Lora.load(lm, adapter);
        }
        return lm;
    }

    /** {@code "; its base, per adapter_config.json, is X"}, or nothing when the config does not say. */
    private static String baseOf(Path adapterDir) {
        try {
            JsonElement base = JsonParser.parseString(Files.readString(adapterDir.resolve(PeftAdapters.CONFIG_FILE)))
                    .getAsJsonObject().get("base_model_name_or_path");
            return base == null || base.isJsonNull() ? "" : "; its base, per " + PeftAdapters.CONFIG_FILE + ", is "
                    + base.getAsString();
        } catch (IOException | RuntimeException e) {
            return "";
        }
    }
}
