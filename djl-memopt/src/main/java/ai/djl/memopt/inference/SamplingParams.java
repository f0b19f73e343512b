package ai.djl.memopt.inference;

import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.List;
import java.util.OptionalLong;

/**
 * How to pick each new token and when to stop. Immutable; build with {@link #builder()}.
 *
 * <p>Temperature 0 (the default) is greedy decoding (argmax). Otherwise the logits are divided by the temperature,
 * restricted to the {@code topK} most likely tokens (0 = no limit), then to the smallest set whose probability reaches
 * {@code topP} (1 = no limit), renormalised, and sampled with a per-sequence random stream seeded by {@code seed}: the
 * same seed gives the same tokens.
 *
 * <pre>{@code
 * SamplingParams p = SamplingParams.builder().setMaxNewTokens(64).optTemperature(0.7f).optTopP(0.9f).optSeed(42).build();
 * }</pre>
 */
public final class SamplingParams {

    /**
     * The largest temperature accepted, as in OpenAI's API: above it sampling is close to uniform noise. The server and
     * {@code memopt generate} check the same bound.
     */
    public static final float MAX_TEMPERATURE = 2f;

    private final int maxNewTokens;
    private final float temperature;
    private final int topK;
    private final float topP;
    private final Long seed;
    private final List<String> stopStrings;
    private final List<Long> eosTokenIds;
    private final boolean ignoreEos;

    private SamplingParams(Builder b) {
        this.maxNewTokens = b.maxNewTokens;
        this.temperature = b.temperature;
        this.topK = b.topK;
        this.topP = b.topP;
        this.seed = b.seed;
        this.stopStrings = ImmutableList.copyOf(b.stopStrings);
        this.eosTokenIds = b.eosTokenIds == null ? null : ImmutableList.copyOf(b.eosTokenIds);
        this.ignoreEos = b.ignoreEos;
    }

    public static Builder builder() {
        return new Builder();
    }

    /** Greedy decoding of at most {@code maxNewTokens} tokens. */
    public static SamplingParams greedy(int maxNewTokens) {
        return builder().setMaxNewTokens(maxNewTokens).build();
    }

    public Builder toBuilder() {
        Builder b = new Builder();
        b.maxNewTokens = maxNewTokens;
        b.temperature = temperature;
        b.topK = topK;
        b.topP = topP;
        b.seed = seed;
        b.stopStrings = stopStrings;
        b.eosTokenIds = eosTokenIds;
        b.ignoreEos = ignoreEos;
        return b;
    }

    public int maxNewTokens() {
        return maxNewTokens;
    }

    public float temperature() {
        return temperature;
    }

    public int topK() {
        return topK;
    }

    public float topP() {
        return topP;
    }

    public OptionalLong seed() {
        return seed == null ? OptionalLong.empty() : OptionalLong.of(seed);
    }

    public List<String> stopStrings() {
        return stopStrings;
    }

    /** The ids that end a sequence; {@code null} means "the tokenizer's / model's EOS ids". */
    public List<Long> eosTokenIds() {
        return eosTokenIds;
    }

    public boolean ignoreEos() {
        return ignoreEos;
    }

    /** True when tokens are picked by argmax. */
    public boolean isGreedy() {
        return temperature == 0f || topK == 1;
    }

    @Override
    public String toString() {
        return "SamplingParams{maxNewTokens=" + maxNewTokens + ", temperature=" + temperature + ", topK=" + topK
                + ", topP=" + topP + ", seed=" + seed + ", stop=" + stopStrings + ", eos=" + eosTokenIds
                + ", ignoreEos=" + ignoreEos + '}';
    }

    /** Builder for {@link SamplingParams}. */
    public static final class Builder {
        private int maxNewTokens = -1;
        private float temperature;
        private int topK;
        private float topP = 1f;
        private Long seed;
        private List<String> stopStrings = List.of();
        private List<Long> eosTokenIds;
        private boolean ignoreEos;

        private Builder() {}

        /** Required: the most tokens to generate per sequence (at least 1). */
        public Builder setMaxNewTokens(int maxNewTokens) {
            this.maxNewTokens = maxNewTokens;
            return this;
        }

        /** 0 (default) = greedy; otherwise the softmax temperature, at most {@link #MAX_TEMPERATURE}. */
        public Builder optTemperature(float temperature) {
            this.temperature = temperature;
            return this;
        }

        /** Keep only the k most likely tokens; 0 (default) = all. */
        public Builder optTopK(int topK) {
            this.topK = topK;
            return this;
        }

        /** Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches p; 1 = all. */
        public Builder optTopP(float topP) {
            this.topP = topP;
            return this;
        }

        /** Seed of the sampling random streams; without one, a fresh random seed per call. */
        public Builder optSeed(long seed) {
            this.seed = seed;
            return this;
        }

        /** Texts that end generation; the output text is cut before the first one found. */
        public Builder optStopStrings(List<String> stopStrings) {
            this.stopStrings = stopStrings;
            return this;
        }

        /** Token ids that end generation (instead of the tokenizer's / model's EOS ids). */
        public Builder optEosTokenIds(List<Long> eosTokenIds) {
            this.eosTokenIds = eosTokenIds;
            return this;
        }

        /** Keep generating past EOS (benchmarks, fixed-length runs). */
        public Builder optIgnoreEos(boolean ignoreEos) {
            this.ignoreEos = ignoreEos;
            return this;
        }

        public SamplingParams build() {
            Preconditions.checkArgument(maxNewTokens >= 1, "maxNewTokens must be set and >= 1, got %s", maxNewTokens);
            Preconditions.checkArgument(temperature >= 0f && temperature <= MAX_TEMPERATURE,
                    "temperature must be in [0, %s], got %s", MAX_TEMPERATURE, temperature);
            Preconditions.checkArgument(topK >= 0, "topK must be >= 0 (0 = no limit), got %s", topK);
            Preconditions.checkArgument(topP > 0f && topP <= 1f, "topP must be in (0, 1], got %s", topP);
            Preconditions.checkArgument(stopStrings != null, "stopStrings must not be null");
            for (String s : stopStrings) {
                Preconditions.checkArgument(s != null && !s.isEmpty(), "stop strings must be non-empty, got %s", stopStrings);
            }
            return new SamplingParams(this);
        }
    }
}
