package ai.djl.memopt.examples.guide;

import ai.djl.memopt.gguf.GgmlType;
import ai.djl.memopt.gguf.GgufExporter;
import ai.djl.memopt.gguf.GgufLoader;
import ai.djl.memopt.gguf.GgufQuantizer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Path;

/** The guide's GGUF snippet. */
public final class GgufSnippet {

    private GgufSnippet() {}

    // guide:begin
    /** Writes a Hugging Face DeepSeek directory as a Q4_0 GGUF file and loads it back with its layers kept in Q4_0. */
    public static DeepSeekForCausalLM exportQ4AndReload(Path dir, Path gguf, NDManager manager) throws IOException {
        DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, manager, DataType.FLOAT32);
        GgufQuantizer.quantize(lm, GgmlType.Q4_0); // our layers, holding exactly ggml's Q4_0 blocks
        GgufExporter.export(lm, dir, GgmlType.Q4_0, gguf, null); // null: recognise the pre-tokenizer
        return GgufLoader.load(gguf, manager, DataType.FLOAT32, true); // true: Q4_0 stays quantized
    }
    // guide:end
}
