package ai.djl.memopt.safetensors;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Path;
import java.util.Locale;

/**
 * Finds NaN and infinite values in a floating tensor's stored bytes, by their bit patterns (an all-ones exponent),
 * without converting them. A weight holding one makes every output NaN, so loaders refuse it by name unless the
 * system property {@value SafetensorsFile#ALLOW_NON_FINITE} is {@code true}.
 */
public final class NonFiniteValues {

    private NonFiniteValues() {}

    /** Whether the user allowed non-finite values ({@code -D}{@value SafetensorsFile#ALLOW_NON_FINITE}{@code =true}). */
    public static boolean allowed() {
        return Boolean.getBoolean(SafetensorsFile.ALLOW_NON_FINITE);
    }

    /**
     * Throws unless every value of {@code data} (little-endian, of a floating {@code dtype}) is finite, or non-finite
     * values are {@link #allowed}; integer types are not checked.
     *
     * @throws SafetensorsFormatException naming the file, the tensor, how many NaN and infinite values it holds and
     *     where the first is
     */
    public static void check(Path file, String name, SafetensorsDType dtype, ByteBuffer bytes)
            throws SafetensorsFormatException {
        if (!dtype.isFloating() || allowed()) {
            return;
        }
        ByteBuffer data = bytes.duplicate().order(ByteOrder.LITTLE_ENDIAN); // whatever order the caller's view has
        int size = dtype.byteSize();
        int base = data.position();
        long n = data.remaining() / size;
        long first = firstNonFinite(dtype, data, base, n);
        if (first < 0) {
            return;
        }
        long nan = 0;
        long inf = 0;
        for (long i = first; i < n; i++) { // the rare path: count what the message reports
            int kind = kind(dtype, data, base + (int) (i * size));
            nan += kind == 1 ? 1 : 0;
            inf += kind == 2 ? 1 : 0;
        }
        String firstKind = kind(dtype, data, base + (int) (first * size)) == 1 ? "NaN" : "infinite";
        throw new SafetensorsFormatException(String.format(Locale.ROOT, "%s: tensor '%s' (%s) holds %d NaN and %d"
                + " infinite values of %d (first at element %d: %s); a model with them computes NaN. Set -D%s=true to"
                + " load it anyway", file, name, dtype, nan, inf, n, first, firstKind,
                SafetensorsFile.ALLOW_NON_FINITE));
    }

    /**
     * The index of the first value whose exponent bits are all ones, or -1. Eight bytes are tested at a time (two
     * F32 or four 16-bit values per {@code long}); only a word with a hit is looked at value by value.
     */
    private static long firstNonFinite(SafetensorsDType dtype, ByteBuffer b, int base, long n) {
        int size = dtype.byteSize();
        int bytes = (int) (n * size);
        int i = 0;
        if (dtype != SafetensorsDType.F64) {
            for (; i + 8 <= bytes; i += 8) {
                if (hit(dtype, b.getLong(base + i))) {
                    break;
                }
            }
        }
        for (long v = i / size; v < n; v++) {
            if (kind(dtype, b, base + (int) (v * size)) != 0) {
                return v;
            }
        }
        return -1;
    }

    /** Whether some value packed in the little-endian word {@code x} has an all-ones exponent. */
    private static boolean hit(SafetensorsDType dtype, long x) {
        if (dtype == SafetensorsDType.F32) {
            long m = x & 0x7f8000007f800000L;
            return (m & 0xffffffffL) == 0x7f800000L || (m >>> 32) == 0x7f800000L;
        }
        long exponent = dtype == SafetensorsDType.F16 ? 0x7c007c007c007c00L : 0x7f807f807f807f80L;
        long y = (x & exponent) ^ exponent; // a zero lane is an all-ones exponent
        return ((y - 0x0001000100010001L) & ~y & 0x8000800080008000L) != 0;
    }

    private static int kind(SafetensorsDType dtype, ByteBuffer b, int at) {
        switch (dtype) {
            case F32: {
                int bits = b.getInt(at);
                return (bits & 0x7f800000) != 0x7f800000 ? 0 : (bits & 0x007fffff) != 0 ? 1 : 2;
            }
            case F16: {
                int h = b.getShort(at);
                return (h & 0x7c00) != 0x7c00 ? 0 : (h & 0x03ff) != 0 ? 1 : 2;
            }
            case BF16: {
                int h = b.getShort(at);
                return (h & 0x7f80) != 0x7f80 ? 0 : (h & 0x007f) != 0 ? 1 : 2;
            }
            case F64: {
                long bits = b.getLong(at);
                return (bits & 0x7ff0000000000000L) != 0x7ff0000000000000L ? 0
                        : (bits & 0x000fffffffffffffL) != 0 ? 1 : 2;
            }
            default:
                return 0;
        }
    }
}
