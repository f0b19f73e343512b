package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;

/**
 * The code tables against bitsandbytes' {@code create_dynamic_map} worked out by hand, and block-wise quantization
 * against a brute-force nearest-entry search in Java.
 */
class BlockwiseCodeTest {

    private static final float[] SIGNED = BlockwiseCode.dynamicMap(true);
    private static final float[] UNSIGNED = BlockwiseCode.dynamicMap(false);

    @Test
    void linspaceMatchesTorch() {
        // torch.linspace(0.1, 1, 5) = [0.1000, 0.3250, 0.5500, 0.7750, 1.0000]
        assertArrayEquals(new float[] {0.1f, 0.325f, 0.55f, 0.775f, 1f}, BlockwiseCode.linspace(0.1f, 1f, 5), 1e-7f);
        assertArrayEquals(new float[] {0.1f, 1f}, BlockwiseCode.linspace(0.1f, 1f, 2), 0f);
    }

    /**
     * create_dynamic_map(signed=True): for decade i = 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1) times
     * 10^(i-6), both signs, then 0 and 1, sorted. Entries by hand: the largest negative magnitude is the last midpoint
     * of linspace(0.1, 1, 65), (1 + (1 - 0.9 / 64)) / 2 = 0.99296875; the smallest positive is 1e-6 (0.1 + 1) / 2;
     * decade 1
     * has midpoints 0.325 and 0.775 of linspace(0.1, 1, 3).
     */
    @Test
    void signedCodeIsBitsandbytesDynamicMap() {
        assertEquals(256, SIGNED.length);
        assertIncreasing(SIGNED);
        assertEquals(-0.99296875f, SIGNED[0], 1e-7f);
        assertEquals(-7.75e-6f, SIGNED[124], 1e-12f);
        assertEquals(-3.25e-6f, SIGNED[125], 1e-12f);
        assertEquals(-5.5e-7f, SIGNED[126], 1e-13f);
        assertEquals(0f, SIGNED[127], 0f);
        assertEquals(5.5e-7f, SIGNED[128], 1e-13f);
        assertEquals(3.25e-6f, SIGNED[129], 1e-12f);
        assertEquals(7.75e-6f, SIGNED[130], 1e-12f);
        assertEquals(0.99296875f, SIGNED[254], 1e-7f);
        assertEquals(1f, SIGNED[255], 0f);
        for (int i = 0; i < 7; i++) {
            assertEquals(1 << i, countIn(SIGNED, Math.pow(10, i - 7), Math.pow(10, i - 6)), "positive decade " + i);
            assertEquals(1 << i, countIn(SIGNED, -Math.pow(10, i - 6), -Math.pow(10, i - 7)), "negative decade " + i);
        }
        assertEquals(127, BlockwiseCode.signedDynamic().zeroIndex());
    }

    /**
     * create_dynamic_map(signed=False): the sign bit buys twice the entries, 2^(i+1) midpoints of
     * linspace(0.1, 1, 2^(i+1) + 1) per decade; by hand the first two are 1e-6 x 0.325 and 1e-6 x 0.775 and the last
     * below 1 is (1 + (1 - 0.9 / 128)) / 2 = 0.996484375.
     */
    @Test
    void unsignedCodeIsBitsandbytesDynamicMap() {
        assertEquals(256, UNSIGNED.length);
        assertIncreasing(UNSIGNED);
        assertEquals(0f, UNSIGNED[0], 0f);
        assertEquals(3.25e-7f, UNSIGNED[1], 1e-13f);
        assertEquals(7.75e-7f, UNSIGNED[2], 1e-13f);
        assertEquals(0.996484375f, UNSIGNED[254], 1e-7f);
        assertEquals(1f, UNSIGNED[255], 0f);
        for (int i = 0; i < 7; i++) {
            assertEquals(2 << i, countIn(UNSIGNED, Math.pow(10, i - 7), Math.pow(10, i - 6)), "decade " + i);
        }
        assertEquals(0, BlockwiseCode.unsignedDynamic().zeroIndex());
    }

    private static void assertIncreasing(float[] code) {
        for (int i = 1; i < code.length; i++) {
            assertTrue(code[i] > code[i - 1], "entry " + i + " " + code[i] + " after " + code[i - 1]);
        }
    }

    private static int countIn(float[] code, double low, double high) {
        int n = 0;
        for (float c : code) {
            n += c > low && c < high ? 1 : 0;
        }
        return n;
    }

    /**
     * Each element is stored as the entry nearest to value / absmax (checked against a brute-force search), so the
     * error is at most half the widest gap times the block's absmax: 0.9 / 64 / 2 for the signed code (the top
     * decade's spacing, also the distance from -1 to -0.99296875), 0.9 / 128 / 2 for the unsigned one.
     */
    @Test
    void roundTripErrorIsTheNearestEntryAndBoundedPerBlock() {
        roundTrip(true, 0.9 / 64 / 2);
        roundTrip(false, 0.9 / 128 / 2);
    }

    private static void roundTrip(boolean signed, double bound) {
        int rows = 6;
        int cols = 2048;
        SplittableRandom r = new SplittableRandom(signed ? 1 : 2);
        float[] x = new float[rows * cols];
        for (int i = 0; i < x.length; i++) {
            int row = i / cols;
            double scale = Math.pow(10, -row); // blocks from 1 down to 1e-5
            double v = r.nextGaussian() * scale * Math.exp(2 * r.nextGaussian()); // heavy tails, many decades
            x[i] = (float) (signed ? v : Math.abs(v));
        }
        x[3 * cols + 7] = signed ? -1e3f : 1e3f; // an outlier only coarsens its own block
        BlockwiseCode table = signed ? BlockwiseCode.signedDynamic() : BlockwiseCode.unsignedDynamic();
        float[] code = table.values();
        try (NDManager m = NDManager.newBaseManager()) {
            BlockwiseCode.OnDevice onDevice = table.upload(m, m.getDevice());
            NDArray a = m.create(x, new Shape(rows, cols));
            NDArray absmax = BlockwiseCode.OnDevice.absmax(a);
            NDArray codes = onDevice.encode(a, absmax);
            assertEquals(DataType.UINT8, codes.getDataType());
            assertEquals(new Shape(rows, cols), codes.getShape());
            float[] back = onDevice.decode(codes, absmax).toFloatArray();
            float[] scales = absmax.toFloatArray();
            for (int i = 0; i < x.length; i++) {
                double s = scales[i / cols];
                double normalized = x[i] / s;
                double best = Double.MAX_VALUE;
                for (float c : code) {
                    best = Math.min(best, Math.abs(normalized - c));
                }
                double err = Math.abs(x[i] - back[i]) / s;
                assertEquals(best, err, 1e-6, "element " + i + " (" + x[i] + ", block absmax " + s + ") not nearest");
                assertTrue(err <= bound + 1e-6, "element " + i + " error " + err + " x absmax over " + bound);
            }
        }
    }

    /**
     * Values tiny relative to their block's maximum keep their magnitude (a linear 8-bit grid of step absmax / 127
     * rounds everything below 0.004 to 0): each decade keeps entries, so the value comes back within a factor of two.
     */
    @Test
    void smallValuesKeepTheirMagnitude() {
        float[] x = {1f, 1e-2f, 3e-3f, 1e-3f, 2e-4f, 3e-5f, 5e-6f, 1e-6f};
        for (boolean signed : new boolean[] {true, false}) {
            BlockwiseCode table = signed ? BlockwiseCode.signedDynamic() : BlockwiseCode.unsignedDynamic();
            try (NDManager m = NDManager.newBaseManager()) {
                BlockwiseCode.OnDevice onDevice = table.upload(m, m.getDevice());
                NDArray a = m.create(x, new Shape(1, x.length));
                NDArray absmax = BlockwiseCode.OnDevice.absmax(a);
                float[] back = onDevice.decode(onDevice.encode(a, absmax), absmax).toFloatArray();
                for (int i = 0; i < x.length; i++) {
                    assertNotEquals(0f, back[i], "signed " + signed + ": " + x[i] + " became 0");
                    assertEquals(x[i], back[i], 0.5 * x[i], "signed " + signed + ": " + x[i]);
                }
            }
        }
    }

    @Test
    void blocksOfZerosStayZero() {
        try (NDManager m = NDManager.newBaseManager()) {
            BlockwiseCode.OnDevice onDevice = BlockwiseCode.unsignedDynamic().upload(m, m.getDevice());
            NDArray a = m.zeros(new Shape(2, 16));
            NDArray absmax = BlockwiseCode.OnDevice.absmax(a);
            NDArray codes = onDevice.encode(a, absmax);
            assertArrayEquals(new byte[32], codes.toByteArray());
            assertArrayEquals(new float[32], onDevice.decode(codes, absmax).toFloatArray(), 0f);
        }
    }

    /**
     * The key tables give the binary search's index for every input: each threshold, entry and the floats next to
     * them, zeros of both signs, +-1, subnormals and the smallest normals, the float at and next to each key's lower
     * bound 2^(k / 1024 - 24), and 2^20 random values of both signs spread over 30 octaves and uniformly over [-1, 1];
     * then again through random block scales (x = y absmax, with elements equal to +-absmax and blocks of subnormals).
     * Checked also against a plain search in Java, so that a broken reference cannot hide a broken table.
     */
    @Test
    void keyTablesEqualTheBinarySearch() {
        for (boolean signed : new boolean[] {true, false}) {
            BlockwiseCode table = signed ? BlockwiseCode.signedDynamic() : BlockwiseCode.unsignedDynamic();
            float[] y = hardValues(table, signed);
            try (NDManager m = NDManager.newBaseManager()) {
                BlockwiseCode.OnDevice onDevice = table.upload(m, m.getDevice());
                int cols = 1024;
                int rows = (y.length + cols - 1) / cols;
                float[] padded = java.util.Arrays.copyOf(y, rows * cols);
                NDArray x = m.create(padded, new Shape(rows, cols));
                NDArray ones = m.ones(new Shape(rows));
                byte[] fast = onDevice.encode(x, ones).toByteArray();
                byte[] search = onDevice.encodeBySearch(x, ones).toByteArray();
                for (int i = 0; i < y.length; i++) {
                    int expected = table.nearest(padded[i]);
                    assertEquals(expected, search[i] & 0xff, "signed " + signed + ": search of " + padded[i]);
                    assertEquals(expected, fast[i] & 0xff, "signed " + signed + ": key tables of " + padded[i]
                            + " (" + Float.floatToRawIntBits(padded[i]) + ")");
                }
                // through block scales: rows of random absmax, one element at +-absmax, and rows of subnormals
                SplittableRandom r = new SplittableRandom(signed ? 11 : 12);
                float[] scales = new float[rows];
                float[] scaled = new float[rows * cols];
                for (int row = 0; row < rows; row++) {
                    boolean subnormal = row % 17 == 3;
                    scales[row] = subnormal ? Float.MIN_NORMAL / (2 + r.nextInt(1000))
                            : (float) Math.pow(2, r.nextDouble(-40, 40));
                    for (int c = 0; c < cols; c++) {
                        float v = padded[row * cols + c] * scales[row];
                        scaled[row * cols + c] = Math.abs(v) <= scales[row] ? v : Math.copySign(scales[row], v);
                    }
                    scaled[row * cols + r.nextInt(cols)] = signed && r.nextBoolean() ? -scales[row] : scales[row];
                }
                NDArray xs = m.create(scaled, new Shape(rows, cols));
                NDArray absmax = BlockwiseCode.OnDevice.absmax(xs);
                assertArrayEquals(onDevice.encodeBySearch(xs, absmax).toByteArray(),
                        onDevice.encode(xs, absmax).toByteArray(), "signed " + signed + ": through block scales");
            }
        }
    }

    private static float[] hardValues(BlockwiseCode table, boolean signed) {
        java.util.List<Float> v = new java.util.ArrayList<>();
        float[] entries = table.values();
        for (int j = 0; j < entries.length; j++) {
            float e = entries[j];
            float t = j == 0 ? e : (float) (((double) entries[j - 1] + e) / 2);
            for (float a : new float[] {e, t}) {
                v.add(a);
                v.add(Math.nextUp(a));
                v.add(Math.nextDown(a));
            }
        }
        for (float a : new float[] {0f, -0f, 1f, Math.nextDown(1f), Float.MIN_VALUE, 2 * Float.MIN_VALUE,
            Float.MIN_NORMAL, Math.nextDown(Float.MIN_NORMAL), Math.nextUp(Float.MIN_NORMAL), 1e-30f, 1e-40f}) {
            v.add(a);
            v.add(-a);
        }
        for (int k = 0; k <= BlockwiseCode.TOP_KEY; k++) {
            float a = (float) Math.pow(2, (double) k / BlockwiseCode.KEYS_PER_OCTAVE - BlockwiseCode.OCTAVES);
            v.add(a);
            v.add(Math.nextUp(a));
            v.add(Math.nextDown(a));
        }
        SplittableRandom r = new SplittableRandom(signed ? 3 : 4);
        for (int i = 0; i < 1 << 20; i++) {
            float a = i % 2 == 0 ? (float) Math.pow(2, -30 * r.nextDouble()) : (float) r.nextDouble();
            v.add(a);
        }
        float[] out = new float[v.size()];
        for (int i = 0; i < out.length; i++) {
            float a = Math.min(1f, v.get(i));
            out[i] = signed && i % 2 == 1 ? -a : Math.abs(a); // the unsigned code's inputs are never negative
            if (!signed && Float.floatToRawIntBits(v.get(i)) == Float.floatToRawIntBits(-0f)) {
                out[i] = -0f;
            }
        }
        return out;
    }
}
