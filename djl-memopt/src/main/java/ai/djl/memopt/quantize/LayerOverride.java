package ai.djl.memopt.quantize;

import com.google.common.base.Preconditions;
import java.util.Optional;
import java.util.regex.Pattern;

/**
 * A per-layer exception to a quantization config, matched against dotted block paths: skip the layer, or use another
 * config (scheme, group size, method) for it. The first matching override wins and takes precedence over the
 * config's {@link LayerFilter}.
 *
 * <p>Overrides are matched against embedding tables too: a {@code use} override that matches an embedding's path
 * quantizes it (RTN, with that config's scheme) even without {@link QuantizationConfig#includeEmbeddings()}, a
 * {@code skip} keeps it in full precision even with it.
 *
 * <p>Globs match the whole path: {@code *} any characters except {@code .}, {@code **} any characters, {@code ?} one
 * character except {@code .}. Regexes ({@code regex(...)}) must match the whole path.
 *
 * <pre>{@code
 * LayerOverride.skip("model.layers.0.**");                          // keep the first layer in full precision
 * LayerOverride.use("**.down_proj", Int8WeightOnlyConfig.builder().build()); // int8 where int4 hurts most
 * LayerOverride.use("model.embed_tokens", Int8WeightOnlyConfig.builder().build()); // int8 embedding table
 * }</pre>
 */
public final class LayerOverride {

    private final String pattern;
    private final Pattern regex;
    private final QuantizationConfig config;

    private LayerOverride(String pattern, Pattern regex, QuantizationConfig config) {
        this.pattern = pattern;
        this.regex = regex;
        this.config = config;
    }

    /** Skips layers whose path matches the glob. */
    public static LayerOverride skip(String glob) {
        return new LayerOverride(glob, globToRegex(glob), null);
    }

    /** Skips layers whose path matches the regex. */
    public static LayerOverride skipRegex(String regex) {
        return new LayerOverride("regex:" + regex, Pattern.compile(regex), null);
    }

    /** Uses {@code config} (its scheme, group size and method; not its filter or overrides) for matching layers. */
    public static LayerOverride use(String glob, QuantizationConfig config) {
        return new LayerOverride(glob, globToRegex(glob), Preconditions.checkNotNull(config, "config"));
    }

    /** Regex form of {@link #use(String, QuantizationConfig)}. */
    public static LayerOverride useRegex(String regex, QuantizationConfig config) {
        return new LayerOverride("regex:" + regex, Pattern.compile(regex), Preconditions.checkNotNull(config));
    }

    /** Whether the override applies to {@code path}. */
    public boolean matches(String path) {
        return regex.matcher(path).matches();
    }

    /** The pattern as given ({@code regex:} prefixed for regexes). */
    public String pattern() {
        return pattern;
    }

    /** The config to use, or empty to skip. */
    public Optional<QuantizationConfig> config() {
        return Optional.ofNullable(config);
    }

    static Pattern globToRegex(String glob) {
        Preconditions.checkArgument(glob != null && !glob.isEmpty(), "empty glob");
        StringBuilder re = new StringBuilder();
        for (int i = 0; i < glob.length(); i++) {
            char c = glob.charAt(i);
            if (c == '*') {
                if (i + 1 < glob.length() && glob.charAt(i + 1) == '*') {
                    re.append(".*");
                    i++;
                } else {
                    re.append("[^.]*");
                }
            } else if (c == '?') {
                re.append("[^.]");
            } else {
                re.append(Pattern.quote(String.valueOf(c)));
            }
        }
        return Pattern.compile(re.toString());
    }

    @Override
    public String toString() {
        return pattern + " -> " + (config == null ? "skip" : config.describe());
    }
}
