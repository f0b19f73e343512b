package ai.djl.memopt.lora;

import ai.djl.ndarray.types.DataType;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.Arrays;
import java.util.List;
import java.util.regex.Pattern;
import java.util.regex.PatternSyntaxException;

/**
 * Which projections get a LoRA adapter and how: rank, alpha, targets. Immutable; the fields mirror Hugging Face PEFT's
 * {@code LoraConfig} so that adapters move between the two ({@link PeftAdapters}).
 *
 * <p>Targets follow PEFT's {@code target_modules}: either a list of names, each matching a module whose dotted path
 * equals it or ends with {@code "." + name} (so {@code "q_a_proj"} matches every layer's
 * {@code model.layers.<i>.self_attn.q_a_proj}), or one regular expression that must match the whole dotted path.
 * {@code exclude_modules} works the same way. Routed MoE experts ({@code ...mlp.experts.<n>....}) are skipped unless
 * {@link Builder#optRoutedExperts(boolean)} is set: a rank-r adapter per expert multiplies the adapter size by the
 * number of experts. (PEFT has no such switch: adapters read from PEFT files are applied with routed experts allowed
 * and their own {@code exclude_modules}.)
 *
 * <pre>{@code
 * LoraConfig config = LoraConfig.builder()
 *         .setRank(16)
 *         .optAlpha(32)
 *         .optTargetModules("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
 *         .build();
 * LoraReport report = Lora.apply(model, config);
 * }</pre>
 */
public final class LoraConfig {

    /** The exclusion that keeps adapters off routed experts, as a PEFT-compatible (Python {@code re}) expression. */
    static final String ROUTED_EXPERTS_REGEX = ".*\\.experts\\.[0-9]+\\..*";

    /** The values: a private copy of the builder that built this config, never changed. */
    private final Builder values;
    private final Pattern targetPattern;
    private final Pattern excludePattern;

    private LoraConfig(Builder b) {
        values = b.copy();
        targetPattern = values.targetRegex == null ? null : Pattern.compile(values.targetRegex);
        excludePattern = values.excludeRegex == null ? null : Pattern.compile(values.excludeRegex);
    }

    /** A new builder. */
    public static Builder builder() {
        return new Builder();
    }

    /** A builder holding this configuration's values, to derive a variant. */
    public Builder toBuilder() {
        return values.copy();
    }

    /** The adapter rank r (PEFT {@code r}). */
    public int rank() {
        return values.rank;
    }

    /** PEFT {@code lora_alpha}. */
    public float alpha() {
        return values.alpha;
    }

    /** Dropout applied to the adapter's input while training (PEFT {@code lora_dropout}). */
    public float dropout() {
        return values.dropout;
    }

    /** PEFT {@code use_rslora}: scale by {@code alpha / sqrt(r)} instead of {@code alpha / r}. */
    public boolean useRslora() {
        return values.useRslora;
    }

    /** The multiplier of the adapter's output: {@code alpha / r}, or {@code alpha / sqrt(r)} with rsLoRA. */
    public float scale() {
        return scale(values.alpha, values.rank, values.useRslora);
    }

    static float scale(float alpha, int rank, boolean useRslora) {
        return useRslora ? (float) (alpha / Math.sqrt(rank)) : alpha / rank;
    }

    /** Target names (list form of PEFT {@code target_modules}); empty when {@link #targetRegex()} is set. */
    public List<String> targetModules() {
        return values.targetModules;
    }

    /** Target regular expression on the whole dotted path (string form of PEFT {@code target_modules}), or null. */
    public String targetRegex() {
        return values.targetRegex;
    }

    /** Names excluded (list form of PEFT {@code exclude_modules}). */
    public List<String> excludeModules() {
        return values.excludeModules;
    }

    /** Exclusion regular expression on the whole dotted path, or null. */
    public String excludeRegex() {
        return values.excludeRegex;
    }

    /** Whether routed MoE experts ({@code .experts.<n>.}) may get adapters. */
    public boolean routedExperts() {
        return values.routedExperts;
    }

    /** The type adapter weights are stored in (FLOAT32 by default). */
    public DataType dataType() {
        return values.dataType;
    }

    /**
     * Whether the module at {@code path} is targeted, by PEFT's rules: list entries match the whole path or its tail
     * after a dot, a regex must match the whole path; exclusions win.
     */
    public boolean matches(String path) {
        boolean target = targetPattern != null ? targetPattern.matcher(path).matches()
                : matchesAny(values.targetModules, path);
        if (!target) {
            return false;
        }
        if (excludePattern != null ? excludePattern.matcher(path).matches() : matchesAny(values.excludeModules, path)) {
            return false;
        }
        return values.routedExperts || !Pattern.matches(ROUTED_EXPERTS_REGEX, path);
    }

    static boolean matchesAny(List<String> names, String path) {
        for (String name : names) {
            if (path.equals(name) || path.endsWith("." + name)) {
                return true;
            }
        }
        return false;
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof LoraConfig && key().equals(((LoraConfig) o).key());
    }

    @Override
    public int hashCode() {
        return key().hashCode();
    }

    /** Every value, for equality. */
    private List<Object> key() {
        return Arrays.asList(rank(), alpha(), dropout(), useRslora(), targetModules(), targetRegex(), excludeModules(),
                excludeRegex(), routedExperts(), dataType());
    }

    @Override
    public String toString() {
        return "LoraConfig{r=" + rank() + ", alpha=" + alpha() + ", dropout=" + dropout()
                + (useRslora() ? ", rslora" : "")
                + ", targets=" + (targetRegex() != null ? "/" + targetRegex() + "/" : targetModules())
                + (excludeRegex() != null ? ", exclude=/" + excludeRegex() + "/"
                        : excludeModules().isEmpty() ? "" : ", exclude=" + excludeModules())
                + (routedExperts() ? ", routedExperts" : "") + ", " + dataType() + "}";
    }

    /** Builds a {@link LoraConfig}: {@code setRank} and one of the target options are required. */
    public static final class Builder implements Cloneable {
        private int rank;
        private float alpha = 8;
        private float dropout;
        private boolean useRslora;
        private ImmutableList<String> targetModules = ImmutableList.of();
        private String targetRegex;
        private ImmutableList<String> excludeModules = ImmutableList.of();
        private String excludeRegex;
        private boolean routedExperts;
        private DataType dataType = DataType.FLOAT32;

        private Builder() {}

        /** A copy (every field is immutable or a primitive, so a shallow one). */
        Builder copy() {
            try {
                return (Builder) clone();
            } catch (CloneNotSupportedException e) {
                throw new AssertionError(e);
            }
        }

        /** The rank r (required, positive). */
        public Builder setRank(int rank) {
            this.rank = rank;
            return this;
        }

        /** {@code lora_alpha} (default 8, as in PEFT). */
        public Builder optAlpha(float alpha) {
            this.alpha = alpha;
            return this;
        }

        /** Dropout on the adapter input while training, in [0, 1) (default 0). */
        public Builder optDropout(float dropout) {
            this.dropout = dropout;
            return this;
        }

        /** Scale by {@code alpha / sqrt(r)} (rsLoRA) instead of {@code alpha / r}. */
        public Builder optUseRslora(boolean useRslora) {
            this.useRslora = useRslora;
            return this;
        }

        /** Target module names (PEFT list semantics: whole path or the tail after a dot). */
        public Builder optTargetModules(String... names) {
            return optTargetModules(Arrays.asList(names));
        }

        /** Target module names (PEFT list semantics: whole path or the tail after a dot). */
        public Builder optTargetModules(List<String> names) {
            this.targetModules = ImmutableList.copyOf(names);
            return this;
        }

        /** A regular expression that must match a module's whole dotted path. */
        public Builder optTargetRegex(String regex) {
            this.targetRegex = regex;
            return this;
        }

        /** Module names never adapted (PEFT {@code exclude_modules} list semantics). */
        public Builder optExcludeModules(List<String> names) {
            this.excludeModules = ImmutableList.copyOf(names);
            return this;
        }

        /** A regular expression on the whole dotted path of modules never adapted. */
        public Builder optExcludeRegex(String regex) {
            this.excludeRegex = regex;
            return this;
        }

        /** Whether routed MoE experts may get adapters (default false). */
        public Builder optRoutedExperts(boolean routedExperts) {
            this.routedExperts = routedExperts;
            return this;
        }

        /** The type of the adapter weights: FLOAT32 (default) or FLOAT16. */
        public Builder optDataType(DataType dataType) {
            this.dataType = dataType;
            return this;
        }

        /**
         * Validates and builds.
         *
         * @throws IllegalArgumentException naming the bad value
         */
        public LoraConfig build() {
            checkAdapterSettings();
            Preconditions.checkArgument(targetRegex == null || targetModules.isEmpty(),
                    "give either target module names %s or a target regex '%s', not both", targetModules,
                    targetRegex);
            Preconditions.checkArgument(targetRegex != null || !targetModules.isEmpty(),
                    "no target modules: set optTargetModules(...) (e.g. \"q_a_proj\", \"o_proj\") or optTargetRegex");
            for (String name : targetModules) {
                Preconditions.checkArgument(name != null && !name.isEmpty(), "empty target module name in %s",
                        targetModules);
            }
            Preconditions.checkArgument(excludeRegex == null || excludeModules.isEmpty(),
                    "give either exclude module names %s or an exclude regex '%s', not both", excludeModules,
                    excludeRegex);
            checkRegex("target", targetRegex);
            checkRegex("exclude", excludeRegex);
            return new LoraConfig(this);
        }

        /**
         * The settings of one adapter (rank, alpha, dropout, rsLoRA, type), validated, with the targets not required:
         * what {@link LoraLinear.Builder} builds from.
         *
         * @throws IllegalArgumentException naming the bad value
         */
        LoraConfig buildAdapterSettings() {
            checkAdapterSettings();
            return new LoraConfig(this);
        }

        private void checkAdapterSettings() {
            Preconditions.checkArgument(rank > 0, "LoRA rank must be positive, got %s", rank);
            Preconditions.checkArgument(Float.isFinite(alpha) && alpha > 0, "lora_alpha must be positive, got %s",
                    alpha);
            Preconditions.checkArgument(dropout >= 0 && dropout < 1, "lora_dropout must be in [0, 1), got %s",
                    dropout);
            Preconditions.checkArgument(dataType == DataType.FLOAT32 || dataType == DataType.FLOAT16,
                    "adapter weights must be FLOAT32 or FLOAT16, got %s%s", dataType,
                    dataType == DataType.BFLOAT16 ? " (BFLOAT16 aborts the JVM in DJL 0.36)" : "");
        }

        private static void checkRegex(String what, String regex) {
            if (regex == null) {
                return;
            }
            try {
                Pattern.compile(regex);
            } catch (PatternSyntaxException e) {
                throw new IllegalArgumentException("invalid " + what + " regex '" + regex + "': " + e.getDescription(),
                        e);
            }
        }
    }
}
