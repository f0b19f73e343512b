package ai.djl.memopt.export;

import static ai.djl.memopt.export.QuantizedArtifact.join;

import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.safetensors.HfCheckpoint;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.Locale;
import java.util.Map;

/**
 * Checks the values of an artifact's quantized tensors against the ranges the format allows, before anything is
 * loaded: checksums only prove that the files are the ones the manifest lists, and a manifest can be rewritten. Out of
 * range, a value still dequantizes, to a wrong weight: an int4 zero point of 255 shifts its whole group, a NaN scale
 * makes the layer compute NaN, a 2:4 code with {@code p0 == p1} puts both kept values in one column.
 *
 * <ul>
 *   <li>{@code scales} and AWQ {@code input_scales}: finite and positive (the writer clamps scales to at least 1e-12);
 *   <li>int4 {@code zeros}: 0..15;
 *   <li>int8 {@code qweight}: -127..127 (symmetric: the writer never stores -128);
 *   <li>{@code sparse24_indices}: every 4-bit code {@code p0 + 4 p1} has {@code p0 < p1}.
 * </ul>
 *
 * <p>int4 codes are nibbles, so always 0..15. Byte tensors are scanned eight bytes at a time.
 */
final class ArtifactRanges {

    private static final long ONES = 0x0101010101010101L;
    private static final long HIGH_BITS = 0x8080808080808080L;
    private static final long HIGH_NIBBLES = 0xF0F0F0F0F0F0F0F0L;

    private ArtifactRanges() {}

    /** Throws naming the first tensor, element and value out of range. */
    static void check(HfCheckpoint st, ArtifactManifest manifest) throws IOException {
        for (Map.Entry<String, ArtifactManifest.LayerEntry> e : manifest.layers().entrySet()) {
            quantized(st, e.getKey(), e.getValue().scheme());
            if (e.getValue().inputScales()) {
                positive(st, join(e.getKey(), "input_scales"), "AWQ input scales");
            }
        }
        for (Map.Entry<String, ArtifactManifest.EmbeddingEntry> e : manifest.embeddings().entrySet()) {
            quantized(st, e.getKey(), e.getValue().scheme());
        }
        for (String path : manifest.sparse24().keySet()) {
            twoFourCodes(st, join(path, "sparse24_indices"));
        }
    }

    private static void quantized(HfCheckpoint st, String path, QuantScheme scheme) throws IOException {
        positive(st, join(path, "scales"), "scales");
        if (scheme == QuantScheme.INT4_WEIGHT_ONLY) {
            String name = join(path, "zeros");
            ByteBuffer b = st.bytes(name);
            long at = firstByte(b, HIGH_NIBBLES, 0);
            if (at >= 0) {
                throw outOfRange(st, name, at, Integer.toString(b.get((int) at) & 0xFF), "int4 zero points are 0..15");
            }
        } else {
            String name = join(path, "qweight");
            ByteBuffer b = st.bytes(name);
            long at = firstByte(b, -1L, HIGH_BITS);
            if (at >= 0) {
                throw outOfRange(st, name, at, "-128", "int8 codes are -127..127 (symmetric; the writer never stores"
                        + " -128)");
            }
        }
    }

    /**
     * The index of the first byte {@code v} of {@code b} with {@code (v & mask) != 0} ({@code equal == 0}), or with
     * {@code v == equal} ({@code mask == -1}, {@code equal} repeated in every byte); -1 if none.
     */
    private static long firstByte(ByteBuffer b, long mask, long equal) {
        int n = b.remaining();
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            long x = b.getLong(i);
            boolean hit = equal == 0 ? (x & mask) != 0 : hasZeroByte(x ^ equal);
            if (hit) {
                break; // the byte loop below finds which
            }
        }
        for (; i < n; i++) {
            int v = b.get(i) & 0xFF;
            if (equal == 0 ? (v & mask & 0xFF) != 0 : v == (int) (equal & 0xFF)) {
                return i;
            }
        }
        return -1;
    }

    private static boolean hasZeroByte(long x) {
        return ((x - ONES) & ~x & HIGH_BITS) != 0;
    }

    private static void positive(HfCheckpoint st, String name, String what) throws IOException {
        ByteBuffer b = st.bytes(name);
        int n = b.remaining() / 4;
        for (int i = 0; i < n; i++) {
            float v = b.getFloat(4 * i);
            if (!(v > 0) || Float.isInfinite(v)) {
                throw outOfRange(st, name, i, Float.toString(v), what + " must be finite and positive");
            }
        }
    }

    private static void twoFourCodes(HfCheckpoint st, String name) throws IOException {
        ByteBuffer b = st.bytes(name);
        int n = b.remaining();
        for (int i = 0; i < n; i++) {
            int v = b.get(i) & 0xFF;
            for (int code : new int[] {v & 0x0F, v >>> 4}) {
                int p0 = code & 3;
                int p1 = code >>> 2;
                if (p0 >= p1) {
                    throw outOfRange(st, name, i, String.format(Locale.ROOT, "0x%02x (a code %d = positions (%d, %d))",
                            v, code, p0, p1), "2:4 codes p0 + 4 p1 must have p0 < p1");
                }
            }
        }
    }

    private static QuantizedArtifactException outOfRange(HfCheckpoint st, String name, long index, String value,
            String rule) {
        long[] shape = st.info(name).shape();
        String where = "element " + index;
        if (shape.length == 2 && shape[1] > 0) {
            where += " (row " + index / shape[1] + ", column " + index % shape[1] + ")";
        }
        return new QuantizedArtifactException(st.fileOf(name).path() + ": tensor '" + name + "': " + where + " is "
                + value + "; " + rule + ". The artifact is corrupt or was changed after export (its checksums were"
                + " recomputed)");
    }
}
