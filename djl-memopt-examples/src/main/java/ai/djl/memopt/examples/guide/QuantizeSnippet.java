package ai.djl.memopt.examples.guide;

import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.nn.Block;

/** The guide's weight-only quantization snippet. */
public final class QuantizeSnippet {

    private QuantizeSnippet() {}

    // guide:begin
    /** Replaces the Linear layers of an initialized block by int8 (or int4) ones, in place. */
    public static QuantizationReport quantize(Block block, boolean int4) {
        QuantizationConfig config = int4
                ? Int4WeightOnlyConfig.builder().optGroupSize(128).build() // 32, 64 or 128
                : Int8WeightOnlyConfig.builder().build(); // one scale per output channel
        QuantizationReport report = Quantizer.quantize(block, config);
        System.out.println(report); // per layer: scheme, group size, bytes before/after, SQNR; what was skipped, why
        return report;
    }
    // guide:end
}
