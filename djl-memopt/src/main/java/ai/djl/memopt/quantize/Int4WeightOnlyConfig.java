package ai.djl.memopt.quantize;

import com.google.common.base.Preconditions;

/**
 * int4 weight-only quantization: asymmetric uint4 with a zero point per group of 32, 64 or 128 consecutive input
 * weights (default 128), packed two per byte (about 7.4x smaller than FP32 at g=128 including scales).
 *
 * <pre>{@code
 * Quantizer.quantize(model, Int4WeightOnlyConfig.builder().optGroupSize(64).optMethod(QuantMethod.AWQ)
 *         .optCalibration(Calibration.of(batches)).build());
 * }</pre>
 */
public final class Int4WeightOnlyConfig extends QuantizationConfig {

    private final int groupSize;
    private final boolean groupSizeFallback;

    private Int4WeightOnlyConfig(Builder b) {
        super(b);
        this.groupSize = b.groupSize;
        this.groupSizeFallback = b.groupSizeFallback;
    }

    /**
     * Whether a layer whose input dimension is not a multiple of the group size uses the largest smaller group size
     * (64, then 32) that divides it, instead of being skipped (default true; the report notes it). DeepSeek-V2-Lite
     * needs it at g128: its dense MLP reads 10944 = 171 x 64 inputs.
     */
    public boolean groupSizeFallback() {
        return groupSizeFallback;
    }

    /** A builder. */
    public static Builder builder() {
        return new Builder();
    }

    @Override
    public QuantScheme scheme() {
        return QuantScheme.INT4_WEIGHT_ONLY;
    }

    @Override
    public int groupSize() {
        return groupSize;
    }

    /** Builder for {@link Int4WeightOnlyConfig}. */
    public static final class Builder extends BaseBuilder<Builder> {
        private int groupSize = 128;
        private boolean groupSizeFallback = true;

        private Builder() {}

        /** Use a smaller group size (64, 32) for layers the group size does not divide (default true). */
        public Builder optGroupSizeFallback(boolean fallback) {
            this.groupSizeFallback = fallback;
            return this;
        }

        @Override
        protected Builder self() {
            return this;
        }

        /** Group size: 32, 64 or 128 (default). */
        public Builder optGroupSize(int groupSize) {
            Preconditions.checkArgument(groupSize == 32 || groupSize == 64 || groupSize == 128,
                    "int4 group size must be 32, 64 or 128, got %s", groupSize);
            this.groupSize = groupSize;
            return this;
        }

        /** Builds the config. */
        public Int4WeightOnlyConfig build() {
            return new Int4WeightOnlyConfig(this);
        }
    }
}
