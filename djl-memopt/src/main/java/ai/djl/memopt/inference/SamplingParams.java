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
 *
 * @param maxNewTokens the most tokens to generate per sequence
 * @param temperature 0 = greedy; otherwise the softmax temperature
 * @param topK keep only the k most likely tokens; 0 = all
 * @param topP nucleus sampling threshold; 1 = all
 * @param seed seed of the sampling random streams; empty: a fresh random seed per call
 * @param stopStrings texts that end generation
 * @param eosTokenIds the ids that end a sequence; {@code null} means "the tokenizer's / model's EOS ids"
 * @param ignoreEos keep generating past EOS
 */
public record SamplingParams(int maxNewTokens, float temperature, int topK, float topP, OptionalLong seed,
        List<String> stopStrings, List<Long> eosTokenIds, boolean ignoreEos) {

    /**
     * The largest temperature accepted, as in OpenAI's API: above it sampling is close to uniform noise. The server and
     * {@code memopt generate} check the same bound.
     */
    public static final float MAX_TEMPERATURE = 2f;

    /**
     * Validates as {@link Builder#build()} does (the builder is the usual way in); {@code seed} null means none,
     * {@code eosTokenIds} null means "the tokenizer's / model's EOS ids".
     *
     * @throws IllegalArgumentException naming the value out of range
     */
    public SamplingParams {
        Preconditions.checkArgument(maxNewTokens >= 1, "maxNewTokens must be set and >= 1, got %s", maxNewTokens);
        Preconditions.checkArgument(temperature >= 0f && temperature <= MAX_TEMPERATURE,
                "temperature must be in [0, %s], got %s", MAX_TEMPERATURE, temperature);
        Preconditions.checkArgument(topK >= 0, "topK must be >= 0 (0 = no limit), got %s", topK);
        Preconditions.checkArgument(topP > 0f && topP <= 1f, "topP must be in (0, 1], got %s", topP);
        Preconditions.checkArgument(stopStrings != null, "stopStrings must not be null");
        for (String s : stopStrings) {
            Preconditions.checkArgument(s != null && !s.isEmpty(), "stop strings must be non-empty, got %s", stopStrings);
        }
        seed = seed == null ? OptionalLong.empty() : seed;
        stopStrings = ImmutableList.copyOf(stopStrings);
        eosTokenIds = eosTokenIds == null ? null : ImmutableList.copyOf(eosTokenIds);
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
        b.seed = seed.isPresent() ? seed.getAsLong() : null;
        b.stopStrings = stopStrings;
        b.eosTokenIds = eosTokenIds;
        b.ignoreEos = ignoreEos;
        return b;
    }

    /** True when tokens are picked by argmax. */
    public boolean isGreedy() {
        return temperature == 0f || topK == 1;
    }

    @Override
    public String toString() {
        return "SamplingParams{maxNewTokens=" + maxNewTokens + ", temperature=" + temperature + ", topK=" + topK
                + ", topP=" + topP + ", seed=" + (seed.isPresent() ? seed.getAsLong() : null) + ", stop=" + stopStrings
                + ", eos=" + eosTokenIds + ", ignoreEos=" + ignoreEos + '}';
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

        /**
         * Validates and builds.
         *
         * @throws IllegalArgumentException naming the value out of range
         */
        public SamplingParams build() {
            return new SamplingParams(maxNewTokens, temperature, topK, topP,
                    seed == null ? OptionalLong.empty() : OptionalLong.of(seed), stopStrings, eosTokenIds, ignoreEos);
        }
    }
}
