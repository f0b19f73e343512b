package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertEquals;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** The update rules against PyTorch's formulas computed by hand in double precision. */
class StatefulOptimizerTest {

    private static final float[] W = {0.5f, -1.0f, 2.0f};
    private static final float[][] G = {{0.1f, -0.2f, 0.3f}, {-0.4f, 0.05f, 0.6f}, {0.2f, 0.2f, -0.1f}};

    private static float[] run(StatefulOptimizer.Kind kind, float wd, float momentum) {
        try (NDManager m = NDManager.newBaseManager();
                StatefulOptimizer opt = StatefulOptimizer.builder().setManager(m).optKind(kind).optLearningRate(0.1f)
                        .optWeightDecay(wd).optMomentum(momentum).build()) {
            NDArray w = m.create(W);
            for (float[] g : G) {
                try (NDArray grad = m.create(g)) {
                    opt.update("p", w, grad);
                }
            }
            assertEquals(3, opt.stepCount("p"));
            Map<String, NDArray> state = opt.stateArrays("p");
            assertEquals(kind == StatefulOptimizer.Kind.SGD ? (momentum == 0 ? 0 : 1) : 2, state.size());
            return w.toFloatArray();
        }
    }

    private static double[] adam(boolean decoupled, double wd) {
        double lr = 0.1;
        double b1 = 0.9;
        double b2 = 0.999;
        double eps = 1e-8;
        double[] w = {W[0], W[1], W[2]};
        double[] m = new double[3];
        double[] v = new double[3];
        for (int t = 1; t <= G.length; t++) {
            for (int i = 0; i < 3; i++) {
                double g = G[t - 1][i] + (decoupled ? 0 : wd * w[i]);
                if (decoupled) {
                    w[i] *= 1 - lr * wd;
                }
                m[i] = b1 * m[i] + (1 - b1) * g;
                v[i] = b2 * v[i] + (1 - b2) * g * g;
                double denom = Math.sqrt(v[i]) / Math.sqrt(1 - Math.pow(b2, t)) + eps;
                w[i] -= lr / (1 - Math.pow(b1, t)) * m[i] / denom;
            }
        }
        return w;
    }

    private static void close(double[] expected, float[] actual) {
        for (int i = 0; i < expected.length; i++) {
            assertEquals(expected[i], actual[i], 1e-6, "element " + i);
        }
    }

    @Test
    void adamWMatchesTorch() {
        close(adam(true, 0.1), run(StatefulOptimizer.Kind.ADAMW, 0.1f, 0));
    }

    @Test
    void adamWithL2MatchesTorch() {
        close(adam(false, 0.1), run(StatefulOptimizer.Kind.ADAM, 0.1f, 0));
    }

    @Test
    void sgdWithMomentumMatchesTorch() {
        double[] w = {W[0], W[1], W[2]};
        double[] buf = new double[3];
        for (int t = 0; t < G.length; t++) {
            for (int i = 0; i < 3; i++) {
                double g = G[t][i] + 0.01 * w[i];
                buf[i] = t == 0 ? g : 0.9 * buf[i] + g;
                w[i] -= 0.1 * buf[i];
            }
        }
        close(w, run(StatefulOptimizer.Kind.SGD, 0.01f, 0.9f));
    }
}
