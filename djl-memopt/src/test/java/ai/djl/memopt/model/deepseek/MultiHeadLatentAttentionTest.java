package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.GradientCollector;
import org.junit.jupiter.api.Test;

/** Attention computed in groups of heads (bounded score memory) equals attention over all heads at once. */
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
            String[] names = {"output", "dq", "dk", "dv"};
            for (int i = 0; i < names.length; i++) {
                assertEquals(whole[i].length, grouped[i].length, names[i]);
                double max = 0;
                double diff = 0;
                for (int j = 0; j < whole[i].length; j++) {
                    max = Math.max(max, Math.abs(whole[i][j]));
                    diff = Math.max(diff, Math.abs(whole[i][j] - grouped[i][j]));
                }
                assertTrue(max > 0, names[i] + " is zero");
                assertTrue(diff <= 1e-6 * max, names[i] + " differs by " + diff + " (max " + max + ")");
            }
        }
    }
}
