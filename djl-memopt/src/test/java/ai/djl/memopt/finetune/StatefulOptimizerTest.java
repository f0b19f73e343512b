package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.util.Map;
import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;

/** The update rules against PyTorch's formulas computed by hand in double precision. */
class StatefulOptimizerTest {

    private static final float[] W = {0.5f, -1.0f, 2.0f};
    private static final float[][] G = {{0.1f, -0.2f, 0.3f}, {-0.4f, 0.05f, 0.6f}, {0.2f, 0.2f, -0.1f}};

    private static float[] run(StatefulOptimizer.Kind kind, float wd, float momentum) {
        return run(kind, wd, momentum, false);
    }

    private static float[] run(StatefulOptimizer.Kind kind, float wd, float momentum, boolean fused) {
        try (NDManager m = NDManager.newBaseManager();
                StatefulOptimizer opt = StatefulOptimizer.builder().setManager(m).optKind(kind).optLearningRate(0.1f)
                        .optWeightDecay(wd).optMomentum(momentum).optWholeParameter(fused).build()) {
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

    /** The fused whole-parameter update (the GPU default, forced here on the CPU) follows the same formulas. */
    @Test
    void fusedAdamMatchesTorch() {
        close(adam(true, 0.1), run(StatefulOptimizer.Kind.ADAMW, 0.1f, 0, true));
        close(adam(false, 0.1), run(StatefulOptimizer.Kind.ADAM, 0.1f, 0, true));
        close(adam(true, 0), run(StatefulOptimizer.Kind.ADAMW, 0f, 0, true));
    }

    /**
     * The fused update (one native Adam call per parameter, whole arrays) equals the blocked update, weights and both
     * moments after three steps, also in the mixed-precision form (FP16 gradient, loss scale, FP16 working copy).
     */
    @Test
    void fusedUpdateEqualsBlockedUpdate() {
        Shape shape = new Shape(37, 11);
        int n = 37 * 11;
        float scale = 512f;
        for (StatefulOptimizer.Kind kind : StatefulOptimizer.Kind.values()) {
            for (boolean mixed : new boolean[] {false, true}) {
                float[][] weights = new float[2][];
                float[][] working = new float[2][];
                float[][][] states = new float[2][][];
                for (int v = 0; v < 2; v++) {
                    SplittableRandom r = new SplittableRandom(11);
                    try (NDManager m = NDManager.newBaseManager();
                            StatefulOptimizer opt = StatefulOptimizer.builder().setManager(m).optKind(kind)
                                    .optLearningRate(0.05f).optWeightDecay(0.1f).optMomentum(0.9f)
                                    .optBlockElements(50).optWholeParameter(v == 1).build()) {
                        NDArray w = m.create(random(r, n, 1), shape);
                        NDArray half = mixed ? w.toType(DataType.FLOAT16, true) : null;
                        for (int step = 0; step < 3; step++) {
                            try (NDArray g = m.create(random(r, n, mixed ? 0.5 * scale : 0.5), shape);
                                    NDArray g16 = g.toType(DataType.FLOAT16, true)) {
                                if (mixed) {
                                    opt.update("p", w, g16, scale, half);
                                } else {
                                    opt.update("p", w, g);
                                }
                            }
                        }
                        weights[v] = w.toFloatArray();
                        working[v] = mixed ? half.toType(DataType.FLOAT32, false).toFloatArray() : null;
                        states[v] = opt.stateArrays("p").values().stream().map(NDArray::toFloatArray)
                                .toArray(float[][]::new);
                    }
                }
                String what = kind + (mixed ? " mixed" : "");
                for (int i = 0; i < n; i++) {
                    assertEquals(weights[0][i], weights[1][i], 2e-6, what + " weight element " + i);
                    if (mixed) {
                        assertEquals(working[0][i], working[1][i], Math.abs(weights[0][i]) * 1e-3,
                                what + " working element " + i);
                    }
                }
                assertEquals(states[0].length, states[1].length, what + " state arrays");
                for (int k = 0; k < states[0].length; k++) {
                    for (int i = 0; i < n; i++) {
                        assertEquals(states[0][k][i], states[1][k][i], 1e-6 + Math.abs(states[0][k][i]) * 1e-6,
                                what + " state " + k + " element " + i);
                    }
                }
            }
        }
    }

    /**
     * {@code updateAll} on flat buckets (forced small: several buckets, a parameter split across none, FP16 and FP32
     * gradients in separate buckets, FP16 working copies for some) equals updating each parameter in blocks; the
     * per-parameter moments stay readable, and a new optimizer restored from them continues identically.
     */
    @Test
    void bucketedUpdateEqualsPerParameterUpdate() {
        Shape[] shapes = {new Shape(7, 5), new Shape(13), new Shape(4, 3, 2), new Shape(40, 3), new Shape(9)};
        boolean[] half = {true, false, true, true, false}; // FP16 gradient + working copy, or FP32
        float scale = 256f;
        for (StatefulOptimizer.Kind kind : new StatefulOptimizer.Kind[] {StatefulOptimizer.Kind.ADAMW,
            StatefulOptimizer.Kind.ADAM}) {
            float[][][] results = new float[2][][];
            for (int v = 0; v < 2; v++) {
                SplittableRandom r = new SplittableRandom(17);
                try (NDManager m = NDManager.newBaseManager()) {
                    StatefulOptimizer.Builder b = StatefulOptimizer.builder().setManager(m).optKind(kind)
                            .optLearningRate(0.02f).optWeightDecay(0.05f).optBlockElements(16).optWholeParameter(v == 1)
                            .optBucketElements(60);
                    StatefulOptimizer opt = b.build();
                    java.util.List<String> ids = new java.util.ArrayList<>();
                    java.util.List<NDArray> weights = new java.util.ArrayList<>();
                    java.util.List<NDArray> copies = new java.util.ArrayList<>();
                    for (int i = 0; i < shapes.length; i++) {
                        ids.add("p" + i);
                        NDArray w = m.create(random(r, (int) shapes[i].size(), 1), shapes[i]);
                        weights.add(w);
                        copies.add(half[i] ? w.toType(DataType.FLOAT16, true) : null);
                    }
                    for (int step = 0; step < 4; step++) {
                        if (step == 2) { // checkpoint round trip of the moments into a fresh optimizer
                            StatefulOptimizer restored = b.build();
                            for (int i = 0; i < shapes.length; i++) {
                                restored.restore("p" + i, "p" + i, opt.stepCount("p" + i), opt.stateArrays("p" + i),
                                        weights.get(i));
                            }
                            opt.close();
                            opt = restored;
                        }
                        java.util.List<NDArray> grads = new java.util.ArrayList<>();
                        for (int i = 0; i < shapes.length; i++) {
                            NDArray g = m.create(random(r, (int) shapes[i].size(), half[i] ? 0.5 * scale : 0.5),
                                    shapes[i]);
                            grads.add(half[i] ? g.toType(DataType.FLOAT16, true) : g);
                        }
                        if (v == 0) {
                            for (int i = 0; i < shapes.length; i++) {
                                opt.update(ids.get(i), weights.get(i), grads.get(i), half[i] ? scale : 1f,
                                        copies.get(i));
                            }
                        } else {
                            // one divisor per call: FP32 gradients were made unscaled, so give them the scale too
                            for (int i = 0; i < shapes.length; i++) {
                                if (!half[i]) {
                                    grads.get(i).muli(scale);
                                }
                            }
                            opt.updateAll(ids, weights, grads, scale, copies);
                        }
                    }
                    results[v] = new float[shapes.length * 4][];
                    for (int i = 0; i < shapes.length; i++) {
                        results[v][4 * i] = weights.get(i).toFloatArray();
                        results[v][4 * i + 1] = opt.stateArrays(ids.get(i)).get("exp_avg").toFloatArray();
                        results[v][4 * i + 2] = opt.stateArrays(ids.get(i)).get("exp_avg_sq").toFloatArray();
                        results[v][4 * i + 3] = half[i] ? copies.get(i).toType(DataType.FLOAT32, false)
                                .toFloatArray() : new float[0];
                        assertEquals(4, opt.stepCount(ids.get(i)));
                    }
                    opt.close();
                }
            }
            for (int a = 0; a < results[0].length; a++) {
                assertEquals(results[0][a].length, results[1][a].length);
                for (int i = 0; i < results[0][a].length; i++) {
                    float x = results[0][a][i];
                    double tol = a % 4 == 3 ? Math.abs(x) * 1e-3 : 2e-6 + Math.abs(x) * 2e-6;
                    assertEquals(x, results[1][a][i], tol, kind + " array " + a + " element " + i);
                }
            }
        }
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

    private static float[] random(SplittableRandom r, int n, double scale) {
        float[] a = new float[n];
        for (int i = 0; i < n; i++) {
            a[i] = (float) ((r.nextDouble() * 2 - 1) * scale);
        }
        return a;
    }

    /**
     * The update of a parameter in blocks of rows (block-sized temporaries) equals the whole-array update of the same
     * rule: weight and state after three steps, for every kind, on a (37, 11) parameter split into blocks of 4 rows.
     */
    @Test
    void blockedUpdateEqualsWholeUpdate() {
        for (StatefulOptimizer.Kind kind : StatefulOptimizer.Kind.values()) {
            float[][] results = new float[2][];
            float[][] states = new float[2][];
            for (int v = 0; v < 2; v++) {
                SplittableRandom r = new SplittableRandom(3);
                try (NDManager m = NDManager.newBaseManager();
                        StatefulOptimizer opt = StatefulOptimizer.builder().setManager(m).optKind(kind)
                                .optLearningRate(0.05f).optWeightDecay(0.1f).optMomentum(0.9f)
                                .optBlockElements(v == 0 ? 50 : Long.MAX_VALUE).build()) {
                    Shape shape = new Shape(37, 11);
                    NDArray w = m.create(random(r, 37 * 11, 1), shape);
                    for (int step = 0; step < 3; step++) {
                        try (NDArray g = m.create(random(r, 37 * 11, 0.5), shape)) {
                            opt.update("p", w, g);
                        }
                    }
                    results[v] = w.toFloatArray();
                    states[v] = opt.stateArrays("p").values().iterator().next().toFloatArray();
                }
            }
            float[] init = random(new SplittableRandom(3), 37 * 11, 1);
            boolean moved = false;
            for (int i = 0; i < init.length; i++) {
                assertEquals(results[1][i], results[0][i], 1e-7, kind + " weight element " + i);
                assertEquals(states[1][i], states[0][i], 1e-7, kind + " state element " + i);
                moved |= results[0][i] != init[i];
            }
            assertTrue(moved, kind + " did not move the weight");
        }
    }

    /**
     * The mixed-precision form (FP16 gradient divided by the loss scale, updated FP32 master copied into the FP16
     * working weight), in blocks, equals unscaling the whole gradient into FP32, a whole-array update and a whole cast.
     */
    @Test
    void blockedMixedPrecisionUpdateEqualsWholeUnscaleUpdateAndCast() {
        Shape shape = new Shape(29, 16);
        float scale = 1024f;
        float[][] masters = new float[2][];
        float[][] working = new float[2][];
        for (int v = 0; v < 2; v++) {
            SplittableRandom r = new SplittableRandom(5);
            try (NDManager m = NDManager.newBaseManager();
                    StatefulOptimizer opt = StatefulOptimizer.builder().setManager(m).optLearningRate(0.01f)
                            .optWeightDecay(0.01f).optBlockElements(v == 0 ? 40 : Long.MAX_VALUE).build()) {
                NDArray master = m.create(random(r, 29 * 16, 1), shape);
                NDArray half = master.toType(DataType.FLOAT16, true);
                for (int step = 0; step < 3; step++) {
                    try (NDArray g32 = m.create(random(r, 29 * 16, 0.5 * scale), shape);
                            NDArray g16 = g32.toType(DataType.FLOAT16, true)) {
                        if (v == 0) {
                            opt.update("p", master, g16, scale, half);
                        } else {
                            try (NDArray unscaled = g16.toType(DataType.FLOAT32, true)) {
                                unscaled.divi(scale);
                                opt.update("p", master, unscaled);
                            }
                            try (NDArray cast = master.toType(DataType.FLOAT16, true)) {
                                half.set(new ai.djl.ndarray.index.NDIndex("..."), cast);
                            }
                        }
                    }
                }
                masters[v] = master.toFloatArray();
                working[v] = half.toType(DataType.FLOAT32, false).toFloatArray();
            }
        }
        for (int i = 0; i < masters[0].length; i++) {
            assertEquals(masters[1][i], masters[0][i], 1e-7, "master element " + i);
            assertEquals(working[1][i], working[0][i], 0.0, "working element " + i);
            assertEquals(masters[0][i], working[0][i], Math.abs(masters[0][i]) * 1e-3, "working copy of element " + i);
        }
    }

    /**
     * Restored state is this optimizer's own memory. The arrays a checkpoint restore passes in are loaded from
     * safetensors into a temporary manager over Java direct buffers, which the garbage collector frees once that
     * manager is closed; state that still pointed into them (DJL's {@code toType(same type, true)} returns an alias,
     * not a copy) was written into freed native memory by every later update: the heap corruption of
     * {@code finetune --resume}. Writing into the source after the restore must not change the state.
     */
    @Test
    void restoreCopiesTheStateOutOfTheArraysItIsGiven() {
        for (StatefulOptimizer.Kind kind : new StatefulOptimizer.Kind[] {StatefulOptimizer.Kind.ADAMW,
                StatefulOptimizer.Kind.SGD}) {
            try (NDManager m = NDManager.newBaseManager();
                    StatefulOptimizer opt = StatefulOptimizer.builder().setManager(m).optKind(kind).optMomentum(0.9f)
                            .build()) {
                NDArray w = m.create(W);
                java.util.Map<String, NDArray> given = new java.util.LinkedHashMap<>();
                try (NDManager source = m.newSubManager()) {
                    for (String key : kind == StatefulOptimizer.Kind.SGD ? new String[] {"momentum_buffer"}
                            : new String[] {"exp_avg", "exp_avg_sq"}) {
                        java.nio.ByteBuffer direct = java.nio.ByteBuffer.allocateDirect(4 * W.length)
                                .order(java.nio.ByteOrder.nativeOrder());
                        direct.asFloatBuffer().put(new float[] {1f, 2f, 3f});
                        given.put(key, source.create(direct, new Shape(W.length), DataType.FLOAT32));
                    }
                    opt.restore("p", "w", 3, given, w);
                    for (NDArray a : given.values()) {
                        a.muli(0); // the caller reuses or frees what it passed in
                    }
                }
                for (Map.Entry<String, NDArray> e : opt.stateArrays("p").entrySet()) {
                    assertArrayEquals(new float[] {1f, 2f, 3f}, e.getValue().toFloatArray(), kind + " " + e.getKey()
                            + " aliases the array it was restored from");
                    assertTrue(e.getValue().getManager() != given.get(e.getKey()).getManager(), e.getKey());
                }
            }
        }
    }
}
