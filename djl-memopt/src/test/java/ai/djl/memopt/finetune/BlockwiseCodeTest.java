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
}
