package ai.djl.memopt.export;

import ai.djl.Device;
import ai.djl.memopt.gguf.GgufLoader;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.PeftAdapters;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.safetensors.NameLists;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonElement;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.LinkOption;
import java.nio.file.Path;
import java.util.Collections;
import java.util.Optional;
import java.util.Set;
import java.util.TreeSet;

/**
 * Opens any DeepSeek model directory this project reads or writes: a Hugging Face checkpoint directory
 * ({@code config.json} + safetensors, BF16/F16/F32) or a quantized artifact written by {@link QuantizedArtifact}
 * (recognised by its {@code quantization.json}), or a GGUF file of llama.cpp's {@code deepseek2} architecture. Every tool that takes {@code --model DIR} goes through here, so an
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
     * The names of the files an artifact's manifest lists (its {@code files}; only those are part of the artifact and
     * covered by its checksums, which {@link #loadDeepSeek} verifies); empty for a plain checkpoint directory, whose
     * every file belongs to the model. Reads the manifest without hashing anything.
     *
     * @throws IOException if the manifest is unreadable or has no {@code files} object
     */
    public static Optional<Set<String>> listedFiles(Path dir) throws IOException {
        if (!isQuantizedArtifact(dir)) {
            return Optional.empty();
        }
        return Optional.of(ArtifactVerifier.readManifest(dir).files().keySet());
    }

    /**
     * Loads a DeepSeek model with float weights only: a checkpoint directory, or a GGUF file dequantized (a quantized
     * artifact is refused by {@link DeepSeekLoader}: use {@link #loadDeepSeek} to keep its layers quantized). The
     * model owns a new manager on {@code device}.
     */
    public static DeepSeekForCausalLM loadFloat(Path path, Device device, DataType dtype) throws IOException {
        return owning(device, manager -> loadFloat(path, manager, dtype));
    }

    /** {@link #loadFloat(Path, Device, DataType)} with weights on {@code manager} (the caller owns it). */
    public static DeepSeekForCausalLM loadFloat(Path path, NDManager manager, DataType dtype) throws IOException {
        return GgufLoader.isGguf(path) ? GgufLoader.load(path, manager, dtype, false)
                : DeepSeekLoader.load(path, manager, dtype);
    }

    /**
     * Loads a DeepSeek model from a checkpoint directory or a quantized artifact (checksums verified).
     *
     * @param dtype FLOAT32 or FLOAT16: the type of the (unquantized) weights and of the computation
     * @throws IOException naming the file and what is wrong, for a missing, corrupt or mismatched directory, and for
     *     a LoRA adapter directory (saying what to load instead)
     */
    public static DeepSeekForCausalLM loadDeepSeek(Path dir, NDManager manager, DataType dtype) throws IOException {
        if (GgufLoader.isGguf(dir)) {
            return GgufLoader.load(dir, manager, dtype, true); // Q8_0/Q4_0 stay quantized
        }
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
     * The tokenizer and generation files ({@code tokenizer.json}, {@code tokenizer_config.json},
     * {@code generation_config.json}, {@code special_tokens_map.json}, {@code chat_template.jinja|json}) that may be
     * used with the model in {@code dir}: for a checkpoint directory, those it holds; for a quantized artifact, those
     * its {@code quantization.json} lists (and checksums), and a file of these names that it holds but does not list
     * is an error rather than silently used or silently ignored.
     *
     * @throws QuantizedArtifactException naming the unlisted files
     */
    public static Set<String> tokenizerFiles(Path dir) throws IOException {
        Set<String> present = new TreeSet<>();
        for (String name : ExportOptions.COMPANIONS) {
            if (Files.exists(dir.resolve(name), LinkOption.NOFOLLOW_LINKS)) {
                present.add(name);
            }
        }
        if (!isQuantizedArtifact(dir)) {
            present.removeIf(name -> !Files.isRegularFile(dir.resolve(name)));
            return Collections.unmodifiableSet(present);
        }
        Set<String> listed = ArtifactVerifier.readManifest(dir).files().keySet();
        Set<String> unlisted = new TreeSet<>(present);
        unlisted.removeAll(listed);
        if (!unlisted.isEmpty()) {
            throw new QuantizedArtifactException(dir + ": " + NameLists.abbreviate(unlisted) + " not listed in its "
                    + QuantizedArtifact.METADATA + ": the artifact was exported without " + (unlisted.size() == 1
                            ? "this file" : "these files") + ", and an artifact is used only with the files its manifest"
                    + " lists and checksums. Remove " + (unlisted.size() == 1 ? "it" : "them") + ", or export again"
                    + " from a model directory that holds " + (unlisted.size() == 1 ? "it" : "them"));
        }
        Set<String> usable = new TreeSet<>(ExportOptions.COMPANIONS);
        usable.retainAll(listed);
        return Collections.unmodifiableSet(usable);
    }

    /**
     * As {@link #loadDeepSeek(Path, NDManager, DataType)}, with the weights on a manager of {@code device} that the
     * model owns: closing the model frees them.
     */
    public static DeepSeekForCausalLM loadDeepSeek(Path dir, Device device, DataType dtype) throws IOException {
        return owning(device, manager -> loadDeepSeek(dir, manager, dtype));
    }

    /** A loading step that puts weights on a manager. */
    @FunctionalInterface
    private interface Loader {
        DeepSeekForCausalLM load(NDManager manager) throws IOException;
    }

    /** Loads onto a new manager of {@code device} that the model owns (closed with it, or at once on failure). */
    private static DeepSeekForCausalLM owning(Device device, Loader loader) throws IOException {
        NDManager manager = NDManager.newBaseManager(device);
        try {
            DeepSeekForCausalLM lm = loader.load(manager);
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
