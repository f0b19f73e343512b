package ai.djl.memopt.quantize;

/**
 * int8 weight-only quantization: symmetric, one scale per output channel (about 4x smaller than FP32, 2x than FP16).
 *
 * <pre>{@code
 * QuantizationReport r = Quantizer.quantize(model, Int8WeightOnlyConfig.builder().build());
 * }</pre>
 */
public final class Int8WeightOnlyConfig extends QuantizationConfig {

    private Int8WeightOnlyConfig(Builder b) {
        super(b);
    }

    /** A builder. */
    public static Builder builder() {
        return new Builder();
    }

    @Override
    public QuantScheme scheme() {
        return QuantScheme.INT8_WEIGHT_ONLY;
    }

    @Override
    public int groupSize() {
        return 0;
    }

    /** Builder for {@link Int8WeightOnlyConfig}. */
    public static final class Builder extends BaseBuilder<Builder> {
        private Builder() {}

        @Override
        protected Builder self() {
            return this;
        }

        /** Builds the config. */
        public Int8WeightOnlyConfig build() {
            return new Int8WeightOnlyConfig(this);
        }
    }
}
