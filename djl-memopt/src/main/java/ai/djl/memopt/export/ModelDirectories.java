package ai.djl.memopt.export;

import ai.djl.memopt.gguf.GgufLoader;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;

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

    /**
     * Loads a DeepSeek model from a checkpoint directory or a quantized artifact (checksums verified).
     *
     * @param dtype FLOAT32 or FLOAT16: the type of the (unquantized) weights and of the computation
     * @throws IOException naming the file and what is wrong, for a missing, corrupt or mismatched directory
     */
    public static DeepSeekForCausalLM loadDeepSeek(Path dir, NDManager manager, DataType dtype) throws IOException {
        if (GgufLoader.isGguf(dir)) {
            return GgufLoader.load(dir, manager, dtype, true); // Q8_0/Q4_0 stay quantized
        }
        if (!Files.isDirectory(dir)) {
            throw new IOException(dir + ": not a model directory");
        }
        return isQuantizedArtifact(dir)
                ? QuantizedArtifact.loadDeepSeek(dir, manager, dtype)
                : DeepSeekLoader.load(dir, manager, dtype);
    }
}
