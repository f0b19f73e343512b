package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.nn.FusedAttention;
import ai.djl.memopt.testing.SystemProperties;
import ai.djl.memopt.testing.Vjp;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import org.junit.jupiter.api.Test;

/**
 * Attention computed in groups of heads (bounded score memory) equals attention over all heads at once, and PyTorch's
 * fused kernel equals the eager formula.
 */
class MultiHeadLatentAttentionTest {

    private static float[][] run(MultiHeadLatentAttention attn, NDArray q, NDArray k, NDArray v, NDArray mask,
            NDArray upstream, boolean grouped) {
        NDArray[] r = Vjp.of(in -> grouped ? attn.attend(in.get(0), in.get(1), in.get(2), mask)
                : attn.attendHeads(in.get(0), in.get(1), in.get(2), mask), upstream, q, k, v);
        float[][] out = new float[r.length][];
        for (int i = 0; i < r.length; i++) {
            out[i] = r[i].toFloatArray();
        }
        return out;
    }

    @Test
    void fusedKernelGivesTheEagerOutputAndGradients() throws Exception {
        DeepSeekConfig config = DeepSeekConfig.preset("bench-tiny");
        MultiHeadLatentAttention attn = new MultiHeadLatentAttention(config, new RotaryEmbedding(config));
        long t = 37;
        try (NDManager m = NDManager.newBaseManager()) {
            NDArray[] a = randomAttention(m, 11, 2, t); // query, key, value, upstream gradient
            float[][] eager = SystemProperties.with(FusedAttention.KERNEL_PROPERTY, "eager",
                    () -> run(attn, a[0], a[1], a[2], null, a[3], true));
            float[][] fused = SystemProperties.with(FusedAttention.KERNEL_PROPERTY, "fused",
                    () -> run(attn, a[0], a[1], a[2], null, a[3], true));
            assertClose(eager, fused, 1e-5);
        }
    }

    /** bench-tiny's 4 heads: query and key {@code (B, 4, T, 24)}, value and upstream gradient {@code (B, 4, T, 16)}. */
    private static NDArray[] randomAttention(NDManager m, int seed, long b, long t) {
        Engine.getInstance().setRandomSeed(seed);
        return new NDArray[] {m.randomNormal(new Shape(b, 4, t, 24)), m.randomNormal(new Shape(b, 4, t, 24)),
            m.randomNormal(new Shape(b, 4, t, 16)), m.randomNormal(new Shape(b, 4, t, 16))};
    }

    private static void assertClose(float[][] expected, float[][] actual, double tolerance) {
        String[] names = {"output", "dq", "dk", "dv"};
        for (int i = 0; i < names.length; i++) {
            assertEquals(expected[i].length, actual[i].length, names[i]);
            double max = 0;
            double diff = 0;
            for (int j = 0; j < expected[i].length; j++) {
                max = Math.max(max, Math.abs(expected[i][j]));
                diff = Math.max(diff, Math.abs(expected[i][j] - actual[i][j]));
            }
            assertTrue(max > 0, names[i] + " is zero");
            assertTrue(diff <= tolerance * max, names[i] + " differs by " + diff + " (max " + max + ")");
        }
    }

    @Test
    void headGroupsGiveTheAllHeadsOutputAndGradients() {
        DeepSeekConfig config = DeepSeekConfig.preset("bench-tiny");
        MultiHeadLatentAttention attn = new MultiHeadLatentAttention(config, new RotaryEmbedding(config));
        long t = 1024; // 4 heads x 1024 x 1024 scores: more than one group of 2^20 score elements
        try (NDManager m = NDManager.newBaseManager()) {
            NDArray[] a = randomAttention(m, 7, 1, t);
            NDArray mask = MultiHeadLatentAttention.causalMask(m, t, t);
            float[][] grouped = run(attn, a[0], a[1], a[2], mask, a[3], true);
            float[][] whole = run(attn, a[0], a[1], a[2], mask, a[3], false);
            assertClose(whole, grouped, 1e-6);
        }
    }
}
