package ai.djl.memopt.lora;

import ai.djl.ndarray.types.DataType;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import com.google.common.collect.ImmutableMap;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.regex.Pattern;
import java.util.regex.PatternSyntaxException;

/**
 * Which projections get a LoRA adapter and how: rank, alpha, targets. Immutable; the fields mirror Hugging Face PEFT's
 * {@code LoraConfig} so that adapters move between the two ({@link PeftAdapters}).
 *
 * <p>Targets follow PEFT 0.21 on transformers 5 ({@link LoraTargets} has the details):
 * <ul>
 *   <li>{@code target_modules}: a list of names, each matching a module whose dotted path equals it or ends with
 *       {@code "." + name} (so {@code "q_a_proj"} matches every layer's {@code model.layers.<i>.self_attn.q_a_proj}),
 *       or one regular expression that must match the whole dotted path. {@code exclude_modules} works the same way.
 *       On a model with routed MoE experts ({@code <...>.experts.<n>.gate_proj}), PEFT rewrites the names
 *       {@code gate_proj}, {@code up_proj} and {@code down_proj} (alone or as the end of a path) into the fused
 *       expert parameters {@code gate_up_proj} and {@code down_proj}: they then mean <b>every routed expert</b>, and
 *       never the dense MLP or the shared experts; {@code gate_proj} needs {@code up_proj} too.</li>
 *   <li>{@code target_parameters}: names matched the same way against parameter keys: {@code <module>.weight} of a
 *       projection ({@code "mlp.gate_proj.weight"}: the dense MLPs; {@code "shared_experts.down_proj.weight"}: the
 *       shared experts) or the fused routed-expert parameters {@code <...>.experts.gate_up_proj} (gate and up of
 *       every expert) and {@code <...>.experts.down_proj}.</li>
 *   <li>{@code rank_pattern} / {@code alpha_pattern}: per-target rank and alpha, keyed by regular expressions that
 *       match the end of the module path or parameter key after a dot, as PEFT's {@code get_pattern_key}.</li>
 * </ul>
 *
 * <pre>{@code
 * LoraConfig config = LoraConfig.builder()
 *         .setRank(16)
 *         .optAlpha(32)
 *         .optTargetModules("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
 *         .optTargetParameters("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight") // dense MLPs
 *         .build();
 * LoraReport report = Lora.apply(model, config);
 * }</pre>
 */
public final class LoraConfig {

    /** The values: a private copy of the builder that built this config, never changed. */
    private final Builder values;
    private final Pattern targetPattern;
    private final Pattern excludePattern;
    private final ImmutableMap<Pattern, Integer> rankPatterns;
    private final ImmutableMap<Pattern, Float> alphaPatterns;

    private LoraConfig(Builder b) {
        values = b.copy();
        targetPattern = values.targetRegex == null ? null : Pattern.compile(values.targetRegex);
        excludePattern = values.excludeRegex == null ? null : Pattern.compile(values.excludeRegex);
        rankPatterns = compileKeys(values.rankPattern);
        alphaPatterns = compileKeys(values.alphaPattern);
    }

    /** PEFT's {@code get_pattern_key}: {@code re.match(rf"(.*\.)?({key})$", name)}. */
    private static <V> ImmutableMap<Pattern, V> compileKeys(Map<String, V> patterns) {
        ImmutableMap.Builder<Pattern, V> out = ImmutableMap.builder();
        patterns.forEach((k, v) -> out.put(Pattern.compile("(.*\\.)?(" + k + ")"), v));
        return out.build();
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

    /** PEFT {@code target_parameters}: names matched against parameter keys (see the class documentation). */
    public List<String> targetParameters() {
        return values.targetParameters;
    }

    /** PEFT {@code rank_pattern}: key pattern to rank, in order (the first matching key wins). */
    public Map<String, Integer> rankPattern() {
        return values.rankPattern;
    }

    /** PEFT {@code alpha_pattern}: key pattern to {@code lora_alpha}, in order (the first matching key wins). */
    public Map<String, Float> alphaPattern() {
        return values.alphaPattern;
    }

    /** The rank of the adapter for a module path or parameter key: {@link #rankPattern()}, else {@link #rank()}. */
    public int rankFor(String key) {
        return lookup(rankPatterns, key, rank());
    }

    /** {@code lora_alpha} for a module path or parameter key: {@link #alphaPattern()}, else {@link #alpha()}. */
    public float alphaFor(String key) {
        return lookup(alphaPatterns, key, alpha());
    }

    private static <V> V lookup(Map<Pattern, V> patterns, String key, V dflt) {
        for (Map.Entry<Pattern, V> e : patterns.entrySet()) {
            if (e.getKey().matcher(key).matches()) {
                return e.getValue();
            }
        }
        return dflt;
    }

    /** The type adapter weights are stored in (FLOAT32 by default). */
    public DataType dataType() {
        return values.dataType;
    }

    /**
     * Whether the module at {@code path} is a {@code target_modules} target, by PEFT's rules: list entries match the
     * whole path or its tail after a dot, a regex must match the whole path; exclusions win. This is the plain rule:
     * {@link Lora#targets} first applies PEFT's rewriting of expert names on a model with routed experts.
     */
    public boolean matches(String path) {
        boolean target = targetPattern != null ? targetPattern.matcher(path).matches()
                : matchesAny(values.targetModules, path);
        return target && !excluded(path);
    }

    /** Whether {@code exclude_modules} names the module at {@code path}. */
    public boolean excluded(String path) {
        return excludePattern != null ? excludePattern.matcher(path).matches() : matchesAny(values.excludeModules, path);
    }

    /**
     * Whether a parameter key ({@code model.layers.0.mlp.gate_proj.weight}, {@code model.layers.1.mlp.experts.down_proj})
     * is a {@code target_parameters} target: equal to an entry or ending with {@code "." + entry}. As in PEFT,
     * {@code exclude_modules} does not apply.
     */
    public boolean matchesParameter(String key) {
        return matchesAny(values.targetParameters, key);
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
                excludeRegex(), targetParameters(), rankPattern(), alphaPattern(), dataType());
    }

    @Override
    public String toString() {
        return "LoraConfig{r=" + rank() + ", alpha=" + alpha() + ", dropout=" + dropout()
                + (useRslora() ? ", rslora" : "")
                + ", targets=" + (targetRegex() != null ? "/" + targetRegex() + "/" : targetModules())
                + (excludeRegex() != null ? ", exclude=/" + excludeRegex() + "/"
                        : excludeModules().isEmpty() ? "" : ", exclude=" + excludeModules())
                + (targetParameters().isEmpty() ? "" : ", parameters=" + targetParameters())
                + (rankPattern().isEmpty() ? "" : ", rank_pattern=" + rankPattern())
                + (alphaPattern().isEmpty() ? "" : ", alpha_pattern=" + alphaPattern()) + ", " + dataType() + "}";
    }

    /** Builds a {@link LoraConfig}: {@code setRank} and target modules or target parameters are required. */
    public static final class Builder implements Cloneable {
        private int rank;
        private float alpha = 8;
        private float dropout;
        private boolean useRslora;
        private ImmutableList<String> targetModules = ImmutableList.of();
        private String targetRegex;
        private ImmutableList<String> excludeModules = ImmutableList.of();
        private String excludeRegex;
        private ImmutableList<String> targetParameters = ImmutableList.of();
        private ImmutableMap<String, Integer> rankPattern = ImmutableMap.of();
        private ImmutableMap<String, Float> alphaPattern = ImmutableMap.of();
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

        /**
         * PEFT {@code target_parameters}: parameter keys or their tails after a dot, e.g. {@code "mlp.gate_proj.weight"}
         * (the dense MLPs), {@code "shared_experts.up_proj.weight"}, {@code "gate_up_proj"} (routed experts).
         */
        public Builder optTargetParameters(String... names) {
            return optTargetParameters(Arrays.asList(names));
        }

        /** PEFT {@code target_parameters} (see {@link #optTargetParameters(String...)}). */
        public Builder optTargetParameters(List<String> names) {
            this.targetParameters = ImmutableList.copyOf(names);
            return this;
        }

        /** PEFT {@code rank_pattern}: regular expression on the end of a module path or parameter key to rank. */
        public Builder optRankPattern(Map<String, Integer> pattern) {
            this.rankPattern = ImmutableMap.copyOf(pattern);
            return this;
        }

        /** PEFT {@code alpha_pattern}: regular expression on the end of a module path or parameter key to alpha. */
        public Builder optAlphaPattern(Map<String, Float> pattern) {
            this.alphaPattern = ImmutableMap.copyOf(pattern);
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
            Preconditions.checkArgument(targetRegex != null || !targetModules.isEmpty() || !targetParameters.isEmpty(),
                    "no targets: set optTargetModules(...) (e.g. \"q_a_proj\", \"o_proj\"), optTargetRegex or "
                            + "optTargetParameters(...)");
            for (String name : targetModules) {
                Preconditions.checkArgument(name != null && !name.isEmpty(), "empty target module name in %s",
                        targetModules);
            }
            for (String name : targetParameters) {
                Preconditions.checkArgument(name != null && !name.isEmpty(), "empty target parameter name in %s",
                        targetParameters);
            }
            rankPattern.forEach((k, v) -> {
                Preconditions.checkArgument(v > 0, "rank_pattern '%s': rank must be positive, got %s", k, v);
                checkRegex("rank_pattern key", k);
            });
            alphaPattern.forEach((k, v) -> {
                Preconditions.checkArgument(Float.isFinite(v) && v > 0, "alpha_pattern '%s': lora_alpha must be "
                        + "positive, got %s", k, v);
                checkRegex("alpha_pattern key", k);
            });
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
