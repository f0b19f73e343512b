package ai.djl.memopt.inference;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import java.util.SplittableRandom;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

class LogitsSamplerTest {

    NDManager manager;

    @BeforeEach
    void open() {
        manager = NDManager.newBaseManager();
    }

    @AfterEach
    void close() {
        manager.close();
    }

    /** Logits whose softmax is exactly these probabilities, in vocabulary order. */
    NDArray logitsOf(double... probs) {
        float[] l = new float[probs.length];
        for (int i = 0; i < probs.length; i++) {
            l[i] = (float) Math.log(probs[i]);
        }
        return manager.create(l, new Shape(1, probs.length));
    }

    SamplingParams.Builder sampling() {
        return SamplingParams.builder().setMaxNewTokens(1).optTemperature(1f);
    }

    @Test
    void greedyAndTopK1AreArgmax() {
        NDArray logits = manager.create(new float[] {0.1f, 2f, -1f, 1.9f, 5f, 4.9f, 0f, 0f}, new Shape(2, 4));
        assertArrayEquals(new long[] {1, 0}, LogitsSampler.sample(logits, SamplingParams.greedy(1), new double[2]));
        SamplingParams topK1 = sampling().optTopK(1).build();
        assertArrayEquals(new long[] {1, 0}, LogitsSampler.sample(logits, topK1, new double[] {0.99, 0.99}));
    }

    @Test
    void temperatureScalesLogits() {
        NDArray logits = manager.create(new float[] {1f, 3f, 2f, 0f}, new Shape(1, 4));
        float[] p = LogitsSampler.probabilities(logits, sampling().optTemperature(2f).build()).toFloatArray();
        double z = Math.exp(0.5) + Math.exp(1.5) + Math.exp(1.0) + 1;
        double[] expected = {Math.exp(0.5) / z, Math.exp(1.5) / z, Math.exp(1.0) / z, 1 / z};
        for (int i = 0; i < 4; i++) {
            assertEquals(expected[i], p[i], 1e-6);
        }
    }

    @Test
    void topKKeepsKRenormalised() {
        NDArray logits = manager.create(new float[] {1f, 3f, 2f, 0f}, new Shape(1, 4));
        float[] p = LogitsSampler.probabilities(logits, sampling().optTopK(2).build()).toFloatArray();
        double z = Math.exp(3) + Math.exp(2);
        assertArrayEquals(new float[] {0f, (float) (Math.exp(3) / z), (float) (Math.exp(2) / z), 0f}, p, 1e-6f);
    }

    @Test
    void topPKeepsTheNucleus() {
        NDArray logits = logitsOf(0.05, 0.5, 0.15, 0.3);
        // sorted: 0.5, 0.3, 0.15, 0.05; with p = 0.7, 0.5 < 0.7 so 0.3 is kept, 0.8 >= 0.7 so 0.15 is not
        float[] p = LogitsSampler.probabilities(logits, sampling().optTopP(0.7f).build()).toFloatArray();
        assertArrayEquals(new float[] {0f, 0.625f, 0f, 0.375f}, p, 1e-6f);
        p = LogitsSampler.probabilities(logits, sampling().optTopP(0.85f).build()).toFloatArray();
        assertArrayEquals(new float[] {0f, 0.5f / 0.95f, 0.15f / 0.95f, 0.3f / 0.95f}, p, 1e-6f);
        // a token alone above p is kept alone
        p = LogitsSampler.probabilities(logits, sampling().optTopP(0.2f).build()).toFloatArray();
        assertArrayEquals(new float[] {0f, 1f, 0f, 0f}, p, 1e-6f);
        // top-k then top-p, as transformers orders them: top-2 renormalises to 0.625/0.375, then p=0.6 keeps one
        p = LogitsSampler.probabilities(logits, sampling().optTopK(2).optTopP(0.6f).build()).toFloatArray();
        assertArrayEquals(new float[] {0f, 1f, 0f, 0f}, p, 1e-6f);
    }

    @Test
    void inverseCdfPicksByCumulativeProbability() {
        NDArray logits = logitsOf(0.05, 0.5, 0.15, 0.3);
        SamplingParams all = sampling().build();
        // cumulative over 1, 3, 2, 0: 0.5, 0.8, 0.95, 1.0
        assertArrayEquals(new long[] {1}, LogitsSampler.sample(logits, all, new double[] {0.1}));
        assertArrayEquals(new long[] {3}, LogitsSampler.sample(logits, all, new double[] {0.6}));
        assertArrayEquals(new long[] {2}, LogitsSampler.sample(logits, all, new double[] {0.9}));
        assertArrayEquals(new long[] {0}, LogitsSampler.sample(logits, all, new double[] {0.97}));
        assertArrayEquals(new long[] {0}, LogitsSampler.sample(logits, all, new double[] {0.9999999}));
        // nucleus 0.7 keeps 0.5 + 0.3 = 0.8: u = 0.9 lands at 0.72, in the second token
        SamplingParams nucleus = sampling().optTopP(0.7f).build();
        assertArrayEquals(new long[] {3}, LogitsSampler.sample(logits, nucleus, new double[] {0.9}));
        assertArrayEquals(new long[] {3}, LogitsSampler.sample(logits, nucleus, new double[] {0.9999999}));
    }

    @Test
    void sampledFrequenciesFollowTheFilteredDistribution() {
        NDArray logits = logitsOf(0.05, 0.5, 0.15, 0.3);
        SamplingParams topK3 = sampling().optTopK(3).build();
        SplittableRandom rng = new SplittableRandom(7);
        int[] counts = new int[4];
        int n = 2000;
        for (int i = 0; i < n; i++) {
            counts[(int) LogitsSampler.sample(logits, topK3, new double[] {rng.nextDouble()})[0]]++;
        }
        assertEquals(0, counts[0], "top-k 3 must never pick the 4th token");
        assertEquals(0.5 / 0.95, counts[1] / (double) n, 0.04);
        assertEquals(0.15 / 0.95, counts[2] / (double) n, 0.04);
        assertEquals(0.3 / 0.95, counts[3] / (double) n, 0.04);
    }

    @Test
    void arraysAreScopedToTheCall() {
        NDArray logits = manager.create(new float[] {1f, 3f, 2f, 0f}, new Shape(1, 4));
        int before = manager.getManagedArrays().size();
        LogitsSampler.sample(logits, sampling().optTopK(2).optTopP(0.9f).build(), new double[] {0.3});
        LogitsSampler.sample(logits, SamplingParams.greedy(1), new double[1]);
        assertEquals(before, manager.getManagedArrays().size());
        assertTrue(!logits.isReleased());
    }

    @Test
    void badParamsAreRejected() {
        assertThrows(IllegalArgumentException.class, () -> SamplingParams.builder().build());
        assertThrows(IllegalArgumentException.class, () -> sampling().optTopP(0f).build());
        assertThrows(IllegalArgumentException.class, () -> sampling().optTopP(1.5f).build());
        assertThrows(IllegalArgumentException.class, () -> sampling().optTopK(-1).build());
        assertThrows(IllegalArgumentException.class, () -> sampling().optTemperature(-0.5f).build());
        assertThrows(IllegalArgumentException.class, () -> sampling().optTemperature(Float.NaN).build());
        // the cap the server applies, for every caller
        assertThrows(IllegalArgumentException.class, () -> sampling().optTemperature(2.5f).build());
    }
}
