package ai.djl.memopt.examples.demo;

import com.google.common.base.Preconditions;
import com.google.gson.JsonObject;

/**
 * What the demo measured for one variant of the model (FP32, int8, int4, ...), every figure from the same run.
 *
 * @param name the variant's name
 * @param peakMemoryBytes peak resident memory of the measuring JVM while the variant was loaded and evaluated (CPU) or
 *     device memory in use at its peak (GPU)
 * @param runtimeBytes the same before any weight was loaded: the JVM and libtorch (-1 where unknown)
 * @param weightBytes bytes of the variant's weights as stored in memory (packed integers and scales for quantized ones)
 * @param perplexity held-out perplexity
 * @param tokensPerSecond generation throughput (new tokens per second, batch 1)
 * @param sample a generated sample
 */
public record VariantResult(String name, long peakMemoryBytes, long runtimeBytes, long weightBytes,
        double perplexity, double tokensPerSecond, String sample) {

    public VariantResult {
        Preconditions.checkArgument(!name.isBlank(), "variant name is blank");
        Preconditions.checkArgument(weightBytes > 0, "variant %s: weightBytes %s", name, weightBytes);
    }

    /** The variant from the JSON line {@link DemoVariantWorker} prints. */
    public static VariantResult fromWorker(String name, JsonObject o) {
        return new VariantResult(name, o.get("peak_memory_bytes").getAsLong(), o.get("runtime_bytes").getAsLong(),
                o.get("weight_bytes").getAsLong(), o.get("perplexity").getAsDouble(),
                o.get("tokens_per_second").getAsDouble(), o.get("sample").getAsString());
    }

    /** One JSON line of the demo's {@code --json} output. */
    public JsonObject toJson() {
        JsonObject o = new JsonObject();
        o.addProperty("event", "variant");
        o.addProperty("variant", name);
        o.addProperty("peak_memory_bytes", peakMemoryBytes);
        o.addProperty("runtime_bytes", runtimeBytes);
        o.addProperty("weight_bytes", weightBytes);
        o.addProperty("perplexity", perplexity);
        o.addProperty("tokens_per_second", tokensPerSecond);
        o.addProperty("sample", sample);
        return o;
    }
}
