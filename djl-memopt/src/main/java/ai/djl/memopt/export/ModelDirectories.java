package ai.djl.memopt.export;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonElement;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Optional;
import java.util.Set;

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
        Path meta = dir.resolve(QuantizedArtifact.METADATA);
        try {
            JsonElement e = JsonParser.parseString(Files.readString(meta, StandardCharsets.UTF_8));
            if (!e.isJsonObject() || !e.getAsJsonObject().has("files") || !e.getAsJsonObject().get("files").isJsonObject()) {
                throw new IOException(meta + ": expected a JSON object with a 'files' object");
            }
            return Optional.of(Set.copyOf(e.getAsJsonObject().getAsJsonObject("files").keySet()));
        } catch (JsonParseException e) {
            throw new IOException(meta + ": invalid JSON: " + e.getMessage(), e);
        }
    }

    /**
     * Loads a DeepSeek model from a checkpoint directory or a quantized artifact (checksums verified).
     *
     * @param dtype FLOAT32 or FLOAT16: the type of the (unquantized) weights and of the computation
     * @throws IOException naming the file and what is wrong, for a missing, corrupt or mismatched directory
     */
    public static DeepSeekForCausalLM loadDeepSeek(Path dir, NDManager manager, DataType dtype) throws IOException {
        if (!Files.isDirectory(dir)) {
            throw new IOException(dir + ": not a model directory");
        }
        return isQuantizedArtifact(dir)
                ? QuantizedArtifact.loadDeepSeek(dir, manager, dtype)
                : DeepSeekLoader.load(dir, manager, dtype);
    }
}
