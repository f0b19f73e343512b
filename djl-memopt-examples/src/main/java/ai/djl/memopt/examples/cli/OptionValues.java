package ai.djl.memopt.examples.cli;

import ai.djl.memopt.inference.SamplingParams;
import java.util.Locale;
import picocli.CommandLine.ITypeConverter;
import picocli.CommandLine.TypeConversionException;

/**
 * Range checks of option values, as picocli converters: a bad value fails while parsing, in the one error format,
 * naming the option ({@code memopt generate: Invalid value for option '--temperature': must be in [0, 2] ...}), before
 * any model is loaded, and never with a library field name such as {@code maxNewTokens}.
 *
 * <pre>{@code
 * @Option(names = "--max-new-tokens", converter = OptionValues.Positive.class) int maxNewTokens;
 * }</pre>
 */
final class OptionValues {

    private OptionValues() {}

    private static long parseLong(String value) {
        try {
            return Long.parseLong(value.trim());
        } catch (NumberFormatException e) {
            throw new TypeConversionException("'" + value + "' is not an integer");
        }
    }

    private static float parseFloat(String value) {
        try {
            float f = Float.parseFloat(value.trim());
            if (!Float.isFinite(f)) {
                throw new NumberFormatException();
            }
            return f;
        } catch (NumberFormatException e) {
            throw new TypeConversionException("'" + value + "' is not a number");
        }
    }

    private static int toInt(long v, String value) {
        if (v > Integer.MAX_VALUE) {
            throw new TypeConversionException("'" + value + "' is too large");
        }
        return (int) v;
    }

    /** An integer of at least {@code min}. */
    private abstract static class AtLeast implements ITypeConverter<Integer> {
        private final long min;

        AtLeast(long min) {
            this.min = min;
        }

        @Override
        public Integer convert(String value) {
            long v = parseLong(value);
            if (v < min) {
                throw new TypeConversionException("must be at least " + min + ", got " + value);
            }
            return toInt(v, value);
        }
    }

    /** An integer of at least 1. */
    static final class Positive extends AtLeast {
        Positive() {
            super(1);
        }
    }

    /** An integer of at least 0. */
    static final class NonNegative extends AtLeast {
        NonNegative() {
            super(0);
        }
    }

    /** A TCP port, 0 (any free one) to 65535. */
    static final class Port implements ITypeConverter<Integer> {
        @Override
        public Integer convert(String value) {
            long v = parseLong(value);
            if (v < 0 || v > 65535) {
                throw new TypeConversionException("must be a port in [0, 65535] (0 = any free one), got " + value);
            }
            return (int) v;
        }
    }

    /** A request body limit: at least 1024 bytes. */
    static final class BodyBytes implements ITypeConverter<Long> {
        @Override
        public Long convert(String value) {
            long v = parseLong(value);
            if (v < 1024) {
                throw new TypeConversionException("must be at least 1024 bytes, got " + value);
            }
            return v;
        }
    }

    /** A sampling temperature in [0, {@link SamplingParams#MAX_TEMPERATURE}], the range the server accepts too. */
    static final class Temperature implements ITypeConverter<Float> {
        @Override
        public Float convert(String value) {
            float t = parseFloat(value);
            if (t < 0 || t > SamplingParams.MAX_TEMPERATURE) {
                throw new TypeConversionException(String.format(Locale.ROOT,
                        "must be in [0, %s] (0 = greedy), got %s", trim(SamplingParams.MAX_TEMPERATURE), value));
            }
            return t;
        }
    }

    /** A nucleus probability mass in (0, 1]. */
    static final class TopP implements ITypeConverter<Float> {
        @Override
        public Float convert(String value) {
            float p = parseFloat(value);
            if (!(p > 0) || p > 1) {
                throw new TypeConversionException("must be in (0, 1], got " + value);
            }
            return p;
        }
    }

    private static String trim(float f) {
        return f == Math.rint(f) ? Long.toString((long) f) : Float.toString(f);
    }
}
