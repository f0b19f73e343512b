package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * 8-bit AdamW against the FP32 rule: the FP32 path bit for bit against {@link StatefulOptimizer}'s AdamW, the 8-bit
 * path within a stated drift over many steps, checkpoints that continue bit for bit, flat memory and named errors.
 */
class EightBitAdamWTest {

    /** 11100 elements: five blocks of 2048 and a partial block of 860; quantized by default (>= 4096). */
    private static final Shape BIG = new Shape(37, 300);
    private static final float LR = 1e-3f;

    /** Blocks of 2048 (the paper's), so that {@link #BIG} has five whole blocks and a partial one. */
    private static EightBitAdamW.Builder builder(NDManager m) {
        return EightBitAdamW.builder().setManager(m).optLearningRate(LR).optWeightDecay(0.01f).optBlockSize(2048);
    }

    /** The default block is bitsandbytes' current 256 (the quality run in docs/benchmarks.md chose it over 2048). */
    @Test
    void defaultBlockIs256AsBitsandbytes() {
        try (NDManager m = NDManager.newBaseManager();
                EightBitAdamW q = EightBitAdamW.builder().setManager(m).build()) {
            assertEquals(256, q.blockSize());
            NDArray w = m.create(new float[(int) BIG.size()], BIG);
            try (NDArray g = m.ones(BIG)) {
                q.step("w", w, g);
            }
            assertEquals(new Shape((11100 + 255) / 256), q.stateArrays("w").get("exp_avg.absmax").getShape());
        }
    }

    /** An FP32-moment EightBitAdamW: the reference the 8-bit path is compared with. */
    private static EightBitAdamW fp32(NDManager m, long chunkElements) {
        return builder(m).optMinQuantizedSize(Long.MAX_VALUE).optChunkElements(chunkElements).build();
    }

    private static float[] random(SplittableRandom r, int n, double scale) {
        float[] a = new float[n];
        for (int i = 0; i < n; i++) {
            a[i] = (float) (r.nextGaussian() * scale);
        }
        return a;
    }

    /**
     * Gradients with a persistent per-element mean and noise, rows scaled from 1 down to 1e-4 so that each block's
     * second moment spans several decades (what the non-linear code is for).
     */
    private static final class Gradients {
        private final float[] mean;
        private final float[] rowScale;
        private final SplittableRandom r;
        private final long cols;

        Gradients(Shape shape, long seed) {
            r = new SplittableRandom(seed);
            int n = (int) shape.size();
            cols = shape.get(shape.dimension() - 1);
            mean = random(r, n, 0.5);
            rowScale = new float[(int) (n / cols)];
            for (int i = 0; i < rowScale.length; i++) {
                rowScale[i] = (float) Math.pow(10, -4.0 * i / Math.max(1, rowScale.length - 1));
            }
        }

        float[] next() {
            float[] g = new float[mean.length];
            for (int i = 0; i < g.length; i++) {
                g[i] = (float) ((mean[i] + r.nextGaussian()) * rowScale[(int) (i / cols)]);
            }
            return g;
        }
    }

    /**
     * The FP32 path (moments kept in FP32) is StatefulOptimizer's AdamW exactly: same bits of weight and moments after
     * 40 steps, unscaled FP32 gradients and FP16 gradients of a scaled loss with an FP16 working copy, chunked over
     * blocks (one block of 2048 per chunk) against StatefulOptimizer's row blocks.
     */
    @Test
    void fp32PathIsStatefulOptimizerAdamWBitForBit() {
        for (boolean mixed : new boolean[] {false, true}) {
            float scale = mixed ? 1024f : 1f;
            try (NDManager m = NDManager.newBaseManager();
                    EightBitAdamW ours = fp32(m, 3000);
                    StatefulOptimizer theirs = StatefulOptimizer.builder().setManager(m)
                            .optKind(StatefulOptimizer.Kind.ADAMW).optLearningRate(LR).optWeightDecay(0.01f)
                            .optBlockElements(1000).build()) {
                float[] init = random(new SplittableRandom(1), (int) BIG.size(), 1);
                NDArray a = m.create(init, BIG);
                NDArray b = m.create(init, BIG);
                NDArray halfA = a.toType(DataType.FLOAT16, true);
                NDArray halfB = b.toType(DataType.FLOAT16, true);
                Gradients grads = new Gradients(BIG, 2);
                for (int t = 0; t < 40; t++) {
                    try (NDArray g32 = m.create(grads.next(), BIG).muli(scale);
                            NDArray g = mixed ? g32.toType(DataType.FLOAT16, true) : g32.duplicate()) {
                        ours.step("p", a, g, scale, mixed ? halfA : null);
                        theirs.update("p", b, g, scale, mixed ? halfB : null);
                    }
                }
                assertFalse(ours.isQuantized("p"));
                assertArrayEquals(b.toFloatArray(), a.toFloatArray(), "mixed " + mixed + ": master");
                assertArrayEquals(halfB.toFloatArray(), halfA.toFloatArray(), "mixed " + mixed + ": working copy");
                for (String key : new String[] {"exp_avg", "exp_avg_sq"}) {
                    assertArrayEquals(theirs.stateArrays("p").get(key).toFloatArray(),
                            ours.stateArrays("p").get(key).toFloatArray(), "mixed " + mixed + ": " + key);
                }
                assertEquals(40, ours.stepCount("p"));
            }
        }
    }

    /** Below the threshold (a 64 x 32 weight, 2048 < 4096) the default optimizer keeps FP32 moments: AdamW exactly. */
    @Test
    void smallTensorsKeepFp32MomentsAndEqualAdamW() {
        Shape shape = new Shape(64, 32);
        try (NDManager m = NDManager.newBaseManager();
                EightBitAdamW ours = builder(m).build();
                StatefulOptimizer theirs = StatefulOptimizer.builder().setManager(m).optLearningRate(LR)
                        .optWeightDecay(0.01f).build()) {
            float[] init = random(new SplittableRandom(3), 2048, 1);
            NDArray a = m.create(init, shape);
            NDArray b = m.create(init, shape);
            Gradients grads = new Gradients(shape, 4);
            for (int t = 0; t < 20; t++) {
                try (NDArray g = m.create(grads.next(), shape)) {
                    ours.step("norm", a, g);
                    theirs.update("norm", b, g);
                }
            }
            assertFalse(ours.isQuantized("norm"));
            assertEquals(java.util.List.of("exp_avg", "exp_avg_sq"), java.util.List.copyOf(
                    ours.stateArrays("norm").keySet()));
            assertArrayEquals(b.toFloatArray(), a.toFloatArray());
            assertEquals(8L * 2048, ours.stateBytes());
        }
    }

    /**
     * 200 steps of 8-bit AdamW against the FP32 path from the same weights and gradients (lr 1e-3, so the FP32 run
     * moves each weight by up to lr x 200 = 0.2). Measured on this input: mean drift 0.008 and max 0.087 of lr x steps,
     * moment errors 0.062 (m) and 0.061 (v) of the block maximum. Bounds and why:
     * <ul>
     *   <li>first moment within 0.0703 x block absmax: each step stores m with an error of at most half the signed
     *       code's widest gap (0.9 / 128 of the block maximum), and an old error decays by beta1 per step, so the
     *       accumulated error is at most 0.9 / 128 / (1 - 0.9) = 0.0703 of the maximum;</li>
     *   <li>second moment within 0.1 x block absmax: the same geometric argument with beta2 = 0.999 gives no useful
     *       bound (the errors are not systematic and cancel), so this bound is the measured value with margin;</li>
     *   <li>weights within 3 % of lr x steps on average and 25 % at worst: the direction m / sqrt(v) of each step
     *       carries the moments' errors, largest, relatively, for the smallest moments of a block; they do not
     *       accumulate in one direction.</li>
     * </ul>
     * A broken code, scale or chunk walk (wrong block's absmax, linear code, moments not written back) exceeds these.
     */
    @Test
    void eightBitDriftFromFp32IsBounded() {
        for (int blockSize : new int[] {2048, 256}) {
            double[] drift = drift(blockSize, 4096, 200);
            String what = "block " + blockSize + ": ";
            System.out.printf("8-bit AdamW vs FP32, 200 steps, %smean |dw| %.4f, max |dw| %.4f (x lr x steps),"
                    + " max moment error %.4f / %.4f (x block absmax)%n", what, drift[0], drift[1], drift[2],
                    drift[3]);
            assertTrue(drift[0] < 0.03, what + "mean drift " + drift[0] + " x lr x steps");
            assertTrue(drift[1] < 0.25, what + "max drift " + drift[1] + " x lr x steps");
            assertTrue(drift[2] < 0.9 / 128 / (1 - 0.9), what + "first-moment error " + drift[2] + " x block absmax");
            assertTrue(drift[3] < 0.1, what + "second-moment error " + drift[3] + " x block absmax");
        }
    }

    /**
     * How many blocks a chunk holds changes nothing: one block per chunk and the whole weight in one chunk give the
     * same bits (every operation is per element or per block), with a partial last block.
     */
    @Test
    void chunkSizeDoesNotChangeTheResult() {
        byte[][] state = new byte[2][];
        float[][] weights = new float[2][];
        for (int v = 0; v < 2; v++) {
            try (NDManager m = NDManager.newBaseManager();
                    EightBitAdamW q = builder(m).optChunkElements(v == 0 ? 2048 : Long.MAX_VALUE).build()) {
                NDArray w = m.create(random(new SplittableRandom(17), (int) BIG.size(), 1), BIG);
                Gradients grads = new Gradients(BIG, 18);
                for (int t = 0; t < 5; t++) {
                    try (NDArray g = m.create(grads.next(), BIG)) {
                        q.step("p", w, g);
                    }
                }
                weights[v] = w.toFloatArray();
                java.io.ByteArrayOutputStream out = new java.io.ByteArrayOutputStream();
                for (NDArray a : q.stateArrays("p").values()) {
                    out.writeBytes(a.toByteArray());
                }
                state[v] = out.toByteArray();
            }
        }
        assertArrayEquals(weights[1], weights[0]);
        assertArrayEquals(state[1], state[0]);
    }

    /**
     * {mean |w8 - w32| / (lr T), max |w8 - w32| / (lr T), max over blocks of max |m8 - m32| / absmax(m32), same for v}.
     */
    static double[] drift(int blockSize, long chunkElements, int steps) {
        try (NDManager m = NDManager.newBaseManager();
                EightBitAdamW q = builder(m).optBlockSize(blockSize).optChunkElements(chunkElements).build();
                EightBitAdamW f = fp32(m, chunkElements)) {
            float[] init = random(new SplittableRandom(5), (int) BIG.size(), 1);
            NDArray a = m.create(init, BIG);
            NDArray b = m.create(init, BIG);
            Gradients grads = new Gradients(BIG, 6);
            for (int t = 0; t < steps; t++) {
                try (NDArray g = m.create(grads.next(), BIG)) {
                    q.step("p", a, g);
                    f.step("p", b, g);
                }
            }
            assertTrue(q.isQuantized("p"));
            float[] wq = a.toFloatArray();
            float[] wf = b.toFloatArray();
            double sum = 0;
            double max = 0;
            for (int i = 0; i < wq.length; i++) {
                double d = Math.abs(wq[i] - wf[i]);
                sum += d;
                max = Math.max(max, d);
            }
            double unit = LR * steps;
            Map<String, NDArray> s = q.stateArrays("p");
            Map<String, NDArray> r = f.stateArrays("p");
            double m1 = momentError(s, "exp_avg", BlockwiseCode.signedDynamic(), r.get("exp_avg"), blockSize);
            double m2 = momentError(s, "exp_avg_sq", BlockwiseCode.unsignedDynamic(), r.get("exp_avg_sq"), blockSize);
            return new double[] {sum / wq.length / unit, max / unit, m1, m2};
        }
    }

    /** Max over blocks of max |dequantized - reference| / max |reference|, decoded in Java from codes and absmax. */
    private static double momentError(Map<String, NDArray> state, String key, BlockwiseCode code, NDArray reference,
            int blockSize) {
        byte[] codes = state.get(key + ".code").toByteArray();
        float[] absmax = state.get(key + ".absmax").toFloatArray();
        float[] ref = reference.toFloatArray();
        float[] table = code.values();
        double worst = 0;
        for (int b0 = 0; b0 < ref.length; b0 += blockSize) {
            double refMax = 0;
            double err = 0;
            for (int i = b0; i < Math.min(ref.length, b0 + blockSize); i++) {
                double v = table[codes[i] & 0xff] * absmax[b0 / blockSize];
                refMax = Math.max(refMax, Math.abs(ref[i]));
                err = Math.max(err, Math.abs(v - ref[i]));
            }
            worst = Math.max(worst, err / refMax);
        }
        return worst;
    }

    /** The 8-bit path with an FP16 gradient of a scaled loss writes the updated master into the FP16 working copy. */
    @Test
    void workingCopyIsTheUpdatedMaster() {
        try (NDManager m = NDManager.newBaseManager(); EightBitAdamW q = builder(m).optChunkElements(4096).build()) {
            NDArray master = m.create(random(new SplittableRandom(7), (int) BIG.size(), 1), BIG);
            NDArray half = master.toType(DataType.FLOAT16, true);
            Gradients grads = new Gradients(BIG, 8);
            for (int t = 0; t < 3; t++) {
                try (NDArray g32 = m.create(grads.next(), BIG).muli(512f);
                        NDArray g16 = g32.toType(DataType.FLOAT16, true)) {
                    q.step("p", master, g16, 512f, half);
                }
            }
            try (NDArray expected = master.toType(DataType.FLOAT16, true)) {
                assertArrayEquals(expected.toFloatArray(), half.toFloatArray());
            }
        }
    }

    /**
     * 30 steps, a checkpoint written to safetensors and read back into a manager that is then closed, a new optimizer
     * restored from it: 30 more steps on both give the same bits of weights and state.
     */
    @Test
    void restoredStateContinuesBitForBit(@TempDir Path dir) throws Exception {
        Shape small = new Shape(10, 10); // FP32 moments, saved alongside
        try (NDManager m = NDManager.newBaseManager();
                EightBitAdamW a = builder(m).optChunkElements(4096).build();
                EightBitAdamW b = builder(m).optChunkElements(4096).build()) {
            Map<String, NDArray> wa = new LinkedHashMap<>();
            wa.put("big", m.create(random(new SplittableRandom(9), (int) BIG.size(), 1), BIG));
            wa.put("small", m.create(random(new SplittableRandom(10), 100, 1), small));
            Map<String, Gradients> grads = Map.of("big", new Gradients(BIG, 11), "small", new Gradients(small, 12));
            steps(a, wa, grads, 30);
            SafetensorsWriter writer = new SafetensorsWriter();
            for (String name : wa.keySet()) {
                for (Map.Entry<String, NDArray> e : a.stateArrays(name).entrySet()) {
                    writer.add(name + "." + e.getKey(), e.getValue());
                }
            }
            Path file = dir.resolve("optimizer.safetensors");
            writer.write(file);
            Map<String, NDArray> wb = new LinkedHashMap<>();
            try (NDManager loaded = m.newSubManager(); SafetensorsFile in = SafetensorsFile.open(file)) {
                for (Map.Entry<String, NDArray> w : wa.entrySet()) {
                    wb.put(w.getKey(), w.getValue().duplicate());
                    Map<String, NDArray> arrays = new LinkedHashMap<>();
                    for (String key : a.stateArrays(w.getKey()).keySet()) {
                        arrays.put(key, in.load(loaded, w.getKey() + "." + key));
                    }
                    b.restore(w.getKey(), w.getKey(), a.stepCount(w.getKey()), arrays, w.getValue());
                }
            }
            System.gc(); // the loaded buffers may be freed now: the restored state must not point into them
            assertEquals(a.stateBytes(), b.stateBytes());
            steps(a, wa, grads, 30); // the same gradients reach both runs: replay them from a copy of the stream
            Map<String, Gradients> replay = Map.of("big", new Gradients(BIG, 11), "small", new Gradients(small, 12));
            skip(replay, 30);
            steps(b, wb, replay, 30);
            for (String name : wa.keySet()) {
                assertEquals(60, b.stepCount(name));
                assertArrayEquals(wa.get(name).toFloatArray(), wb.get(name).toFloatArray(), name);
                for (Map.Entry<String, NDArray> e : a.stateArrays(name).entrySet()) {
                    NDArray other = b.stateArrays(name).get(e.getKey());
                    assertArrayEquals(e.getValue().toByteArray(), other.toByteArray(), name + "." + e.getKey());
                }
            }
            assertTrue(a.isQuantized("big") && b.isQuantized("big"));
        }
    }

    private static void steps(EightBitAdamW opt, Map<String, NDArray> weights, Map<String, Gradients> grads, int n) {
        for (int t = 0; t < n; t++) {
            for (Map.Entry<String, NDArray> w : weights.entrySet()) {
                NDArray weight = w.getValue();
                try (NDArray g = weight.getManager().create(grads.get(w.getKey()).next(), weight.getShape())) {
                    opt.step(w.getKey(), weight, g);
                }
            }
        }
    }

    private static void skip(Map<String, Gradients> grads, int n) {
        for (int t = 0; t < n; t++) {
            grads.get("big").next();
            grads.get("small").next();
        }
    }

    /** saveState / restoreState: named copies with the step, restored as copies. */
    @Test
    void savedListRoundTrips() {
        try (NDManager m = NDManager.newBaseManager();
                EightBitAdamW a = builder(m).build();
                EightBitAdamW b = builder(m).build()) {
            NDArray w = m.create(random(new SplittableRandom(13), (int) BIG.size(), 1), BIG);
            Gradients grads = new Gradients(BIG, 14);
            for (int t = 0; t < 3; t++) {
                try (NDArray g = m.create(grads.next(), BIG)) {
                    a.step("p", w, g);
                }
            }
            try (NDManager saved = m.newSubManager()) {
                NDList list = a.saveState("p", saved);
                assertEquals(java.util.List.of("exp_avg.code", "exp_avg.absmax", "exp_avg_sq.code",
                        "exp_avg_sq.absmax", "step"),
                        list.stream().map(NDArray::getName).collect(java.util.stream.Collectors.toList()));
                assertEquals(DataType.UINT8, list.get(0).getDataType());
                assertEquals(new Shape(11100), list.get(0).getShape());
                assertEquals(new Shape(6), list.get(1).getShape());
                b.restoreState("p", "p", list, w);
            }
            assertEquals(3, b.stepCount("p"));
            for (Map.Entry<String, NDArray> e : a.stateArrays("p").entrySet()) {
                assertArrayEquals(e.getValue().toByteArray(), b.stateArrays("p").get(e.getKey()).toByteArray());
            }
        }
    }

    /** Two moments of one byte per element plus one FP32 scale per block each: 2 (11100 + 4 x 6) bytes. */
    @Test
    void stateBytesAreExact() {
        try (NDManager m = NDManager.newBaseManager(); EightBitAdamW q = builder(m).build()) {
            NDArray w = m.create(new float[(int) BIG.size()], BIG);
            NDArray bias = m.zeros(new Shape(300));
            try (NDArray g = m.ones(BIG); NDArray gb = m.ones(new Shape(300))) {
                q.step("w", w, g);
                q.step("b", bias, gb);
            }
            assertEquals(2 * (11100 + 4 * 6) + 8 * 300, q.stateBytes());
        }
    }

    /**
     * Many steps allocate nothing that outlives them: the arrays under the manager (weights, gradients' manager, state,
     * code tables) are as many after 60 steps as after the first.
     */
    @Test
    void memoryStaysFlatOverManySteps() {
        try (NDManager m = NDManager.newBaseManager(); EightBitAdamW q = builder(m).optChunkElements(4096).build()) {
            NDArray w = m.create(random(new SplittableRandom(15), (int) BIG.size(), 1), BIG);
            NDArray half = w.toType(DataType.FLOAT16, true);
            Gradients grads = new Gradients(BIG, 16);
            int after1 = -1;
            for (int t = 0; t < 60; t++) {
                try (NDArray g = m.create(grads.next(), BIG)) {
                    q.step("p", w, g, 2f, half);
                }
                if (t == 0) {
                    after1 = m.getManagedArrays().size();
                }
            }
            assertTrue(after1 >= 10, "weight, working copy, 4 state arrays, 4 code tables: " + after1);
            assertEquals(after1, m.getManagedArrays().size());
        }
    }

    @Test
    void badInputsGiveNamedErrors() {
        try (NDManager m = NDManager.newBaseManager(); EightBitAdamW q = builder(m).build()) {
            NDArray w = m.zeros(BIG);
            NDArray half = m.zeros(BIG, DataType.FLOAT16);
            String msg = assertThrows(IllegalArgumentException.class, () -> q.step("layer.w", half, w)).getMessage();
            assertTrue(msg.contains("layer.w") && msg.contains("float16"), msg);
            msg = assertThrows(IllegalArgumentException.class, () -> q.step("layer.w", w, m.zeros(new Shape(37, 299))))
                    .getMessage();
            assertTrue(msg.contains("layer.w") && msg.contains("(37, 299)") && msg.contains("(37, 300)"), msg);
            msg = assertThrows(IllegalArgumentException.class, () -> q.step("layer.w", w, w, 0f, null)).getMessage();
            assertTrue(msg.contains("layer.w") && msg.contains("0.0"), msg);
            q.step("layer.w", w, m.ones(BIG));
            NDArray other = m.zeros(new Shape(300, 37));
            msg = assertThrows(IllegalArgumentException.class, () -> q.step("layer.w", other, other)).getMessage();
            assertTrue(msg.contains("layer.w") && msg.contains("(300, 37)") && msg.contains("(37, 300)"), msg);

            Map<String, NDArray> arrays = new LinkedHashMap<>(q.stateArrays("layer.w"));
            arrays.remove("exp_avg_sq.absmax");
            msg = assertThrows(IllegalArgumentException.class, () -> q.restore("id", "layer.w", 1, arrays, w))
                    .getMessage();
            assertTrue(msg.contains("layer.w") && msg.contains("exp_avg_sq.absmax"), msg);
            Map<String, NDArray> wrongType = new LinkedHashMap<>(q.stateArrays("layer.w"));
            wrongType.put("exp_avg.code", m.zeros(new Shape(11100)));
            msg = assertThrows(IllegalArgumentException.class, () -> q.restore("id", "layer.w", 1, wrongType, w))
                    .getMessage();
            assertTrue(msg.contains("layer.w.exp_avg.code") && msg.contains("uint8"), msg);
            Map<String, NDArray> wrongShape = new LinkedHashMap<>(q.stateArrays("layer.w"));
            wrongShape.put("exp_avg.absmax", m.zeros(new Shape(5)));
            msg = assertThrows(IllegalArgumentException.class, () -> q.restore("id", "layer.w", 1, wrongShape, w))
                    .getMessage();
            assertTrue(msg.contains("layer.w.exp_avg.absmax") && msg.contains("(5)") && msg.contains("(6)"), msg);
            assertEquals(0, q.stepCount("id"));
        }
        msg("block size must be >= 1, got 0", b -> b.optBlockSize(0));
        msg("beta2 must be in [0, 1), got 1.0", b -> b.optBetas(0.9f, 1f));
        msg("minimum quantized size must be >= 0, got -1", b -> b.optMinQuantizedSize(-1));
        msg("learning rate must be finite and >= 0, got NaN", b -> b.optLearningRate(Float.NaN));
        assertEquals("EightBitAdamW needs a manager: call setManager", assertThrows(IllegalArgumentException.class,
                () -> EightBitAdamW.builder().build()).getMessage());
    }

    private static void msg(String expected, java.util.function.UnaryOperator<EightBitAdamW.Builder> edit) {
        try (NDManager m = NDManager.newBaseManager()) {
            assertEquals(expected, assertThrows(IllegalArgumentException.class,
                    () -> edit.apply(EightBitAdamW.builder().setManager(m)).build()).getMessage());
        }
    }
}
