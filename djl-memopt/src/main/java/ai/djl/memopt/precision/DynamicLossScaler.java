package ai.djl.memopt.precision;

import ai.djl.memopt.nn.Scalars;
import ai.djl.ndarray.NDArray;
import com.google.common.base.Preconditions;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.util.LinkedHashMap;
import java.util.Locale;
import java.util.Map;

/**
 * Dynamic loss scaling for FP16 training: the loss is multiplied by a scale before backward so small gradients do
 * not underflow in FP16; a step whose gradients contain inf/NaN is skipped and the scale halved; after
 * {@code growthInterval} clean steps in a row the scale doubles. Defaults follow PyTorch's {@code GradScaler}: initial
 * scale 2^16, growth x2 every 2000 clean steps, backoff x0.5.
 *
 * <p>State (scale, clean-step counter, totals) round-trips through {@link #state()} / {@link #restore(Map)} or JSON for
 * training checkpoints. Not thread-safe: one scaler per training loop.
 */
public final class DynamicLossScaler {

    private final float initialScale;
    private final float growthFactor;
    private final float backoffFactor;
    private final int growthInterval;
    private final float minScale;
    private final float maxScale;

    private float scale;
    private int cleanSteps;
    private long steps;
    private long skippedSteps;

    private DynamicLossScaler(Builder b) {
        this.initialScale = b.initialScale;
        this.growthFactor = b.growthFactor;
        this.backoffFactor = b.backoffFactor;
        this.growthInterval = b.growthInterval;
        this.minScale = b.minScale;
        this.maxScale = b.maxScale;
        this.scale = b.initialScale;
    }

    /** A scaler with the defaults. */
    public static DynamicLossScaler create() {
        return builder().build();
    }

    public static Builder builder() {
        return new Builder();
    }

    /** The current scale. */
    public float getScale() {
        return scale;
    }

    /** {@code loss * scale}, to call backward on. */
    public NDArray scale(NDArray loss) {
        return Scalars.mul(loss, scale);
    }

    /**
     * Records the outcome of a step.
     *
     * @param overflow whether the gradients contained inf or NaN
     * @return true if the step may be applied (no overflow)
     */
    public boolean update(boolean overflow) {
        steps++;
        if (overflow) {
            skippedSteps++;
            cleanSteps = 0;
            scale = Math.max(minScale, scale * backoffFactor);
            return false;
        }
        cleanSteps++;
        if (cleanSteps >= growthInterval) {
            cleanSteps = 0;
            scale = Math.min(maxScale, scale * growthFactor);
        }
        return true;
    }

    /**
     * Records a step whose overflow was recovered inside the step rather than skipped (the fused update retries the
     * overflowing layer at a lower scale, see {@code FusedUpdate}): the step counts as taken, neither skipped nor clean;
     * the scale is lowered {@code backoffs} times for the next step and the run of clean steps starts again.
     */
    public void recordRecoveredOverflow(int backoffs) {
        steps++;
        cleanSteps = 0;
        for (int i = 0; i < backoffs; i++) {
            scale = Math.max(minScale, scale * backoffFactor);
        }
    }

    /** The factor an overflow multiplies the scale by. */
    public float getBackoffFactor() {
        return backoffFactor;
    }

    /** The lowest scale. */
    public float getMinScale() {
        return minScale;
    }

    /** Clean steps since the last change of scale. */
    public int getCleanSteps() {
        return cleanSteps;
    }

    /** Steps recorded, including skipped ones. */
    public long getSteps() {
        return steps;
    }

    /** Steps skipped because of inf/NaN gradients. */
    public long getSkippedSteps() {
        return skippedSteps;
    }

    /** The state to save with a training checkpoint (configuration and counters), as strings. */
    public Map<String, String> state() {
        Map<String, String> m = new LinkedHashMap<>();
        m.put("scale", Float.toString(scale));
        m.put("clean_steps", Integer.toString(cleanSteps));
        m.put("steps", Long.toString(steps));
        m.put("skipped_steps", Long.toString(skippedSteps));
        m.put("initial_scale", Float.toString(initialScale));
        m.put("growth_factor", Float.toString(growthFactor));
        m.put("backoff_factor", Float.toString(backoffFactor));
        m.put("growth_interval", Integer.toString(growthInterval));
        m.put("min_scale", Float.toString(minScale));
        m.put("max_scale", Float.toString(maxScale));
        return m;
    }

    /** {@link #state()} as a JSON object string. */
    public String toJson() {
        JsonObject o = new JsonObject();
        state().forEach(o::addProperty);
        return o.toString();
    }

    /**
     * Rebuilds a scaler from {@link #state()}.
     *
     * @throws IllegalArgumentException naming the missing or malformed field
     */
    public static DynamicLossScaler restore(Map<String, String> state) {
        DynamicLossScaler s = builder()
                .optInitialScale(floatField(state, "initial_scale"))
                .optGrowthFactor(floatField(state, "growth_factor"))
                .optBackoffFactor(floatField(state, "backoff_factor"))
                .optGrowthInterval((int) longField(state, "growth_interval"))
                .optMinScale(floatField(state, "min_scale"))
                .optMaxScale(floatField(state, "max_scale"))
                .build();
        float scale = floatField(state, "scale");
        Preconditions.checkArgument(
                scale >= s.minScale && scale <= s.maxScale && Float.isFinite(scale),
                "loss scaler state: scale %s outside [%s, %s]", scale, s.minScale, s.maxScale);
        s.scale = scale;
        s.cleanSteps = (int) longField(state, "clean_steps");
        s.steps = longField(state, "steps");
        s.skippedSteps = longField(state, "skipped_steps");
        Preconditions.checkArgument(s.cleanSteps >= 0 && s.steps >= 0 && s.skippedSteps >= 0,
                "loss scaler state: negative counter in %s", state);
        return s;
    }

    /** Rebuilds a scaler from {@link #toJson()}. */
    public static DynamicLossScaler fromJson(String json) {
        JsonObject o;
        try {
            o = JsonParser.parseString(json).getAsJsonObject();
        } catch (RuntimeException e) {
            throw new IllegalArgumentException("loss scaler state is not a JSON object: " + e.getMessage(), e);
        }
        Map<String, String> m = new LinkedHashMap<>();
        o.entrySet().forEach(e -> m.put(e.getKey(), e.getValue().getAsString()));
        return restore(m);
    }

    private static float floatField(Map<String, String> state, String key) {
        String v = state.get(key);
        Preconditions.checkArgument(v != null, "loss scaler state has no field '%s'", key);
        try {
            return Float.parseFloat(v);
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException("loss scaler state field '" + key + "' is not a number: " + v, e);
        }
    }

    private static long longField(Map<String, String> state, String key) {
        String v = state.get(key);
        Preconditions.checkArgument(v != null, "loss scaler state has no field '%s'", key);
        try {
            return Long.parseLong(v);
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException("loss scaler state field '" + key + "' is not an integer: " + v, e);
        }
    }

    @Override
    public String toString() {
        return String.format(Locale.ROOT, "DynamicLossScaler(scale=%s, clean=%d, skipped=%d/%d)", scale, cleanSteps,
                skippedSteps, steps);
    }

    /** Builder; every option has PyTorch GradScaler's default. */
    public static final class Builder {
        private float initialScale = 65536f;
        private float growthFactor = 2f;
        private float backoffFactor = 0.5f;
        private int growthInterval = 2000;
        private float minScale = 1f;
        private float maxScale = 16777216f; // 2^24

        private Builder() {}

        public Builder optInitialScale(float v) {
            this.initialScale = v;
            return this;
        }

        public Builder optGrowthFactor(float v) {
            this.growthFactor = v;
            return this;
        }

        public Builder optBackoffFactor(float v) {
            this.backoffFactor = v;
            return this;
        }

        public Builder optGrowthInterval(int v) {
            this.growthInterval = v;
            return this;
        }

        /** Lower bound of the scale (default 1). */
        public Builder optMinScale(float v) {
            this.minScale = v;
            return this;
        }

        /** Upper bound of the scale (default 2^24). */
        public Builder optMaxScale(float v) {
            this.maxScale = v;
            return this;
        }

        public DynamicLossScaler build() {
            Preconditions.checkArgument(initialScale > 0 && Float.isFinite(initialScale),
                    "initial scale must be positive and finite, got %s", initialScale);
            Preconditions.checkArgument(growthFactor > 1, "growth factor must be > 1, got %s", growthFactor);
            Preconditions.checkArgument(backoffFactor > 0 && backoffFactor < 1,
                    "backoff factor must be in (0, 1), got %s", backoffFactor);
            Preconditions.checkArgument(growthInterval >= 1, "growth interval must be >= 1, got %s", growthInterval);
            Preconditions.checkArgument(minScale > 0 && minScale <= initialScale && initialScale <= maxScale
                    && Float.isFinite(maxScale),
                    "need 0 < min scale (%s) <= initial scale (%s) <= max scale (%s) < inf", minScale, initialScale,
                    maxScale);
            return new DynamicLossScaler(this);
        }
    }
}
