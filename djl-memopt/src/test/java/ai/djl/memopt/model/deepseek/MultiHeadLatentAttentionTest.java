package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.nn.FusedAttention;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.GradientCollector;
import org.junit.jupiter.api.Test;

/**
 * Attention computed in groups of heads (bounded score memory) equals attention over all heads at once, and PyTorch's
 * fused kernel equals the eager formula.
 */
class MultiHeadLatentAttentionTest {

    private static float[][] run(MultiHeadLatentAttention attn, NDManager m, NDArray q0, NDArray k0, NDArray v0,
            NDArray mask, NDArray upstream, boolean grouped) {
        NDArray q = q0.duplicate();
        NDArray k = k0.duplicate();
        NDArray v = v0.duplicate();
        q.setRequiresGradient(true);
        k.setRequiresGradient(true);
        v.setRequiresGradient(true);
        float[] out;
        try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
            NDArray o = grouped ? attn.attend(q, k, v, mask) : attn.attendHeads(q, k, v, mask); // (1, 4, T, v)
            out = o.toFloatArray();
            gc.backward(o.mul(upstream).sum());
        }
        return new float[][] {out, q.getGradient().toFloatArray(), k.getGradient().toFloatArray(),
            v.getGradient().toFloatArray()};
    }

    @Test
    void fusedKernelGivesTheEagerOutputAndGradients() {
        DeepSeekConfig config = DeepSeekConfig.preset("bench-tiny");
        MultiHeadLatentAttention attn = new MultiHeadLatentAttention(config, new RotaryEmbedding(config));
        long t = 37;
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(11);
            NDArray q = m.randomNormal(new Shape(2, 4, t, 24));
            NDArray k = m.randomNormal(new Shape(2, 4, t, 24));
            NDArray v = m.randomNormal(new Shape(2, 4, t, 16));
            NDArray upstream = m.randomNormal(new Shape(2, 4, t, 16));
            float[][] eager = withKernel("eager", () -> run(attn, m, q, k, v, null, upstream, true));
            float[][] fused = withKernel("fused", () -> run(attn, m, q, k, v, null, upstream, true));
            assertClose(eager, fused, 1e-5);
        }
    }

    private static float[][] withKernel(String kernel, java.util.function.Supplier<float[][]> body) {
        String before = System.setProperty(FusedAttention.KERNEL_PROPERTY, kernel);
        try {
            return body.get();
        } finally {
            if (before == null) {
                System.clearProperty(FusedAttention.KERNEL_PROPERTY);
            } else {
                System.setProperty(FusedAttention.KERNEL_PROPERTY, before);
            }
        }
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
            Engine.getInstance().setRandomSeed(7);
            NDArray q = m.randomNormal(new Shape(1, 4, t, 24));
            NDArray k = m.randomNormal(new Shape(1, 4, t, 24));
            NDArray v = m.randomNormal(new Shape(1, 4, t, 16));
            NDArray upstream = m.randomNormal(new Shape(1, 4, t, 16));
            NDArray mask = MultiHeadLatentAttention.causalMask(m, t, t);
            float[][] grouped = run(attn, m, q, k, v, mask, upstream, true);
            float[][] whole = run(attn, m, q, k, v, mask, upstream, false);
            assertClose(whole, grouped, 1e-6);
        }
    }
}
