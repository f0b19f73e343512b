package ai.djl.memopt.model.deepseek;

import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.nn.Parameter;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;

/**
 * Saves a {@link DeepSeekForCausalLM} as a Hugging Face model directory: {@code config.json} and a single
 * {@code model.safetensors} with the Hugging Face tensor names, each written atomically (temporary file in the same
 * directory, then an atomic move), so {@link DeepSeekLoader} (or transformers) loads it back equal.
 *
 * <pre>{@code
 * DeepSeekCheckpointWriter.save(model, model.config(), outDir);
 * }</pre>
 */
public final class DeepSeekCheckpointWriter {

    private DeepSeekCheckpointWriter() {}

    /**
     * Writes {@code config.json} and {@code model.safetensors} into {@code dir} (created if needed).
     *
     * @throws IllegalArgumentException if {@code config} is not the model's config or a parameter is uninitialised
     * @throws IOException if writing fails (existing files are then left as they were)
     */
    public static void save(DeepSeekForCausalLM model, DeepSeekConfig config, Path dir) throws IOException {
        if (!config.equals(model.config())) {
            throw new IllegalArgumentException("config " + config + " differs from the model's " + model.config());
        }
        Map<String, Parameter> params = BlockTrees.parameters(model);
        java.util.Set<String> expected = BlockTrees.parameters(new DeepSeekForCausalLM(config)).keySet();
        for (String name : params.keySet()) {
            if (!expected.contains(name)) {
                throw new IllegalArgumentException("parameter '" + name + "' is not a Hugging Face tensor of this "
                        + "model (a decorator is in place?): merge or remove decorators before saving");
            }
        }
        for (String name : expected) {
            if (!params.containsKey(name)) {
                throw new IllegalArgumentException("the model has no parameter '" + name
                        + "' (a decorator replaced its block?): merge or remove decorators before saving");
            }
        }
        Files.createDirectories(dir);
        SafetensorsWriter writer = new SafetensorsWriter();
        writer.putMetadata("format", "pt");
        for (Map.Entry<String, Parameter> e : params.entrySet()) {
            if (!e.getValue().isInitialized()) {
                throw new IllegalArgumentException("parameter " + e.getKey() + " is not initialised");
            }
            writer.add(e.getKey(), e.getValue().getArray());
        }
        writer.write(dir.resolve("model.safetensors"));
        AtomicFiles.writeString(dir.resolve("config.json"), config.toJson() + "\n");
    }
}
