package ai.djl.memopt.quantize;

import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.ArrayList;
import java.util.List;
import java.util.Optional;

/**
 * An immutable quantization recipe for {@link Quantizer#quantize}: the scheme (by subclass: {@link
 * Int8WeightOnlyConfig}, {@link Int4WeightOnlyConfig}), the method (RTN or AWQ with {@link Calibration}), which
 * layers ({@link LayerFilter}, default {@link LayerFilter#defaults()}) and per-layer {@link LayerOverride}s.
 */
public abstract class QuantizationConfig {

    private final QuantMethod method;
    private final LayerFilter filter;
    private final List<LayerOverride> overrides;
    private final Calibration calibration;
    private final int awqGridSize;
    private final boolean includeEmbeddings;

    protected QuantizationConfig(BaseBuilder<?> b) {
        this.method = b.method;
        this.filter = b.filter;
        this.overrides = ImmutableList.copyOf(b.overrides);
        this.calibration = b.calibration;
        this.awqGridSize = b.awqGridSize;
        this.includeEmbeddings = b.includeEmbeddings;
    }

    /**
     * Whether embedding tables (the DeepSeek {@code TokenEmbedding}, DJL's {@code Embedding}) are quantized too, with
     * this config's scheme: int8 one scale per row (token), int4 groups along the hidden dimension (see {@link
     * QuantizedEmbedding}); always round to nearest (a lookup has no input activations for AWQ or GPTQ). Default
     * false: embeddings stay in full precision unless this is set or a {@link LayerOverride} names them.
     */
    public boolean includeEmbeddings() {
        return includeEmbeddings;
    }

    /** The scheme. */
    public abstract QuantScheme scheme();

    /** Input weights per scale: the int4 group size, or 0 for int8 (one scale per output channel). */
    public abstract int groupSize();

    /** The method. */
    public QuantMethod method() {
        return method;
    }

    /** The layer filter. */
    public LayerFilter filter() {
        return filter;
    }

    /** Per-layer overrides, first match wins. */
    public List<LayerOverride> overrides() {
        return overrides;
    }

    /** Calibration inputs (required when this config or an override uses AWQ). */
    public Optional<Calibration> calibration() {
        return Optional.ofNullable(calibration);
    }

    /** Number of AWQ exponents tried: {@code alpha = i / n} for {@code i = 0..n-1}. */
    public int awqGridSize() {
        return awqGridSize;
    }

    /** A short description, e.g. {@code int4 g128 awq}. */
    public String describe() {
        return scheme().id() + (groupSize() > 0 ? " g" + groupSize() : "") + " " + method.id()
                + (includeEmbeddings ? " +embeddings" : "");
    }

    @Override
    public String toString() {
        return describe();
    }

    /** Options shared by every scheme's builder. */
    public abstract static class BaseBuilder<T extends BaseBuilder<T>> {
        private QuantMethod method = QuantMethod.RTN;
        private LayerFilter filter = LayerFilter.defaults();
        private final List<LayerOverride> overrides = new ArrayList<>();
        private Calibration calibration;
        private int awqGridSize = 20;
        private boolean includeEmbeddings;

        protected abstract T self();

        /** RTN (default) or AWQ (needs {@link #optCalibration}). */
        public T optMethod(QuantMethod method) {
            this.method = Preconditions.checkNotNull(method, "method");
            return self();
        }

        /** Which Linear layers to quantize (default {@link LayerFilter#defaults()}). */
        public T optFilter(LayerFilter filter) {
            this.filter = Preconditions.checkNotNull(filter, "filter");
            return self();
        }

        /** Shorthand for the default filter with {@code lm_head} included or not. */
        public T optIncludeLmHead(boolean include) {
            this.filter = LayerFilter.defaults(include);
            return self();
        }

        /**
         * Quantize embedding tables too (default false), with this config's scheme and group size, round to nearest.
         * For another scheme on the embedding only, add an override instead, e.g. {@code
         * LayerOverride.use("model.embed_tokens", Int8WeightOnlyConfig.builder().build())}.
         */
        public T optIncludeEmbeddings(boolean include) {
            this.includeEmbeddings = include;
            return self();
        }

        /** Adds a per-layer override (checked in the order added). */
        public T addOverride(LayerOverride override) {
            overrides.add(Preconditions.checkNotNull(override, "override"));
            return self();
        }

        /** Calibration inputs for AWQ. */
        public T optCalibration(Calibration calibration) {
            this.calibration = calibration;
            return self();
        }

        /** AWQ search grid size (default 20, as AutoAWQ). */
        public T optAwqGridSize(int n) {
            Preconditions.checkArgument(n >= 1 && n <= 1000, "AWQ grid size must be in [1, 1000], got %s", n);
            this.awqGridSize = n;
            return self();
        }
    }
}
