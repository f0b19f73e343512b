package ai.djl.memopt.examples.demo;

import com.google.common.base.Preconditions;

/**
 * What the demo measured for one variant of the model (FP32, int8, int4, ...), every figure from the same run.
 *
 * @param name the variant's name
 * @param peakMemoryBytes peak resident memory while the variant was loaded and evaluated (CPU) or device memory in use
 *     at its peak (GPU)
 * @param weightBytes bytes of the variant's weights as stored in memory (packed integers and scales for quantized ones)
 * @param perplexity held-out perplexity
 * @param tokensPerSecond generation throughput (new tokens per second, batch 1)
 * @param sample a generated sample
 */
public record VariantResult(
        String name, long peakMemoryBytes, long weightBytes, double perplexity, double tokensPerSecond, String sample) {

    public VariantResult {
        Preconditions.checkArgument(!name.isBlank(), "variant name is blank");
        Preconditions.checkArgument(weightBytes > 0, "variant %s: weightBytes %s", name, weightBytes);
    }
}
