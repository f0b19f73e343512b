package ai.djl.memopt.examples.guide;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.StreamingQuantizedLoader;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Path;

/** The guide's streaming int4 load snippet. */
public final class StreamingLoadSnippet {

    private StreamingLoadSnippet() {}

    // guide:begin
    /** Loads a Hugging Face DeepSeek directory straight into int4, one tensor at a time. */
    public static DeepSeekForCausalLM loadInt4(Path dir, NDManager manager) throws IOException {
        StreamingQuantizedLoader.Result r = StreamingQuantizedLoader.load(dir, manager, DataType.FLOAT16,
                Int4WeightOnlyConfig.builder().optGroupSize(128).build());
        System.out.println(r.report()); // quantized layers are QuantizedLinear; the float model never exists
        return r.model();
    }
    // guide:end
}
