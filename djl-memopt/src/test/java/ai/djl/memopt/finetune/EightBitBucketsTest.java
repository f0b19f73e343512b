package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.io.ByteArrayOutputStream;
import java.util.ArrayList;
import java.util.List;
import java.util.SplittableRandom;
import java.util.function.BiConsumer;
import org.junit.jupiter.api.Test;

/**
 * {@link EightBitAdamW#stepAll} (buckets) against the per-parameter update and against the reference binary-search
 * encode, bit for bit: weights, FP16 working copies, codes, scales and FP32 moments, over several steps; with a restore
 * in the middle, parameter lists of a fused update's groups, and per-parameter step counts that differ.
 */
class EightBitBucketsTest {

    /**
     * Block 256, chunks of 6 blocks (1536 elements), 8-bit from 512 elements: block multiples that share buckets,
     * one that is not a multiple (2000, alone), one larger than a chunk (3072, alone, two chunks), FP32-moment ones
     * (bias 300, 7 x 9) in buckets of their own, FP16 gradients with working copies and FP32 gradients.
     */
    private static final Shape[] SHAPES = {new Shape(4, 128), new Shape(300), new Shape(2, 256), new Shape(8, 128),
        new Shape(2000), new Shape(7, 9), new Shape(12, 256), new Shape(3, 256), new Shape(512)};
    private static final boolean[] HALF = {true, true, true, true, true, true, true, false, false};
    private static final float SCALE = 512f;

    private static EightBitAdamW.Builder builder(NDManager m) {
        return EightBitAdamW.builder().setManager(m).optLearningRate(2e-3f).optWeightDecay(0.01f).optBlockSize(256)
                .optMinQuantizedSize(512).optChunkElements(1536);
    }

    /** The parameters of one run: FP32 masters, FP16 copies (or null) and seeded gradients per step. */
    private static final class Run {
        final List<String> ids = new ArrayList<>();
        final List<NDArray> masters = new ArrayList<>();
        final List<NDArray> copies = new ArrayList<>();
        final SplittableRandom r = new SplittableRandom(5);
        final NDManager m;

        Run(NDManager m) {
            this.m = m;
            for (int i = 0; i < SHAPES.length; i++) {
                ids.add("p" + i);
                NDArray w = m.create(gaussian((int) SHAPES[i].size(), 1), SHAPES[i]);
                masters.add(w);
                copies.add(HALF[i] ? w.toType(DataType.FLOAT16, true) : null);
            }
        }

        float[] gaussian(int n, double scale) {
            float[] a = new float[n];
            for (int i = 0; i < n; i++) {
                a[i] = (float) (r.nextGaussian() * scale * (i % 97 == 0 ? 30 : 1)); // outliers: varied scales
            }
            return a;
        }

        /** Gradients of the next step: FP16 of a loss scaled by SCALE, or FP32 scaled the same way. */
        List<NDArray> grads() {
            List<NDArray> out = new ArrayList<>();
            for (int i = 0; i < SHAPES.length; i++) {
                NDArray g = m.create(gaussian((int) SHAPES[i].size(), 0.1 * SCALE), SHAPES[i]);
                if (HALF[i]) {
                    try (NDArray wide = g) {
                        g = wide.toType(DataType.FLOAT16, true);
                    }
                }
                out.add(g);
            }
            return out;
        }

        void perParameter(EightBitAdamW opt, List<NDArray> grads, List<Integer> which) {
            for (int i : which) {
                opt.step(ids.get(i), masters.get(i), grads.get(i), SCALE, copies.get(i));
            }
        }

        void bucketed(EightBitAdamW opt, List<NDArray> grads, List<Integer> which) {
            List<String> i2 = new ArrayList<>();
            List<NDArray> w2 = new ArrayList<>();
            List<NDArray> g2 = new ArrayList<>();
            List<NDArray> c2 = new ArrayList<>();
            for (int i : which) {
                i2.add(ids.get(i));
                w2.add(masters.get(i));
                g2.add(grads.get(i));
                c2.add(copies.get(i));
            }
            opt.stepAll(i2, w2, g2, SCALE, c2);
        }

        /** Every weight, working copy and state array, and the step counts, as bytes. */
        byte[] bytes(EightBitAdamW opt) {
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            for (int i = 0; i < SHAPES.length; i++) {
                out.writeBytes(masters.get(i).toByteArray());
                if (copies.get(i) != null) {
                    out.writeBytes(copies.get(i).toByteArray());
                }
                for (NDArray a : opt.stateArrays(ids.get(i)).values()) {
                    out.writeBytes(a.toByteArray());
                }
                out.write((int) opt.stepCount(ids.get(i)));
            }
            return out.toByteArray();
        }
    }

    private static List<Integer> all() {
        List<Integer> out = new ArrayList<>();
        for (int i = 0; i < SHAPES.length; i++) {
            out.add(i);
        }
        return out;
    }

    /** Runs {@code steps} steps with {@code update} from the same seeds; the final bytes. */
    private static byte[] run(boolean search, int steps, BiConsumer<Run, EightBitAdamW> check,
            UpdateKind update) {
        try (NDManager m = NDManager.newBaseManager();
                EightBitAdamW opt = builder(m).optSearchEncode(search).build()) {
            Run run = new Run(m);
            for (int t = 0; t < steps; t++) {
                try (NDManager step = m.newSubManager()) {
                    List<NDArray> grads = run.grads();
                    for (NDArray g : grads) {
                        g.attach(step);
                    }
                    update.apply(run, opt, grads, t);
                }
            }
            check.accept(run, opt);
            return run.bytes(opt);
        }
    }

    private interface UpdateKind {
        void apply(Run run, EightBitAdamW opt, List<NDArray> grads, int step);
    }

    @Test
    void bucketsEqualPerParameterAndTheReferenceSearchBitForBit() {
        byte[] reference = run(true, 5, (r, o) -> { }, (run, opt, g, t) -> run.perParameter(opt, g, all()));
        byte[] perParameter = run(false, 5, (r, o) -> { }, (run, opt, g, t) -> run.perParameter(opt, g, all()));
        byte[] bucketed = run(false, 5, (run, opt) -> {
            assertTrue(opt.isQuantized("p0") && opt.isQuantized("p4") && !opt.isQuantized("p1"));
            // 8-bit FP16: p0 p2 p3 (512 + 512 + 1024 > 1536: two buckets, p3 alone), p6 3072 alone, p4 not a
            // multiple; FP32 moments: p1 and p5 together; FP32 gradients: p7 and p8 together
            assertEquals(3, opt.bucketCount(run.ids), "buckets");
            // each member's arrays have its own shapes: codes of its size, one scale per block of 256
            assertEquals(new Shape(1024), opt.stateArrays("p3").get("exp_avg.code").getShape());
            assertEquals(new Shape(4), opt.stateArrays("p3").get("exp_avg_sq.absmax").getShape());
            assertEquals(new Shape(7, 9), opt.stateArrays("p5").get("exp_avg").getShape());
        }, (run, opt, g, t) -> run.bucketed(opt, g, all()));
        assertArrayEquals(reference, perParameter, "key tables against the binary search");
        assertArrayEquals(perParameter, bucketed, "buckets against per parameter");
        byte[] searchBucketed = run(true, 5, (r, o) -> { }, (run, opt, g, t) -> run.bucketed(opt, g, all()));
        assertArrayEquals(reference, searchBucketed, "buckets with the binary search");
    }

    /**
     * A fused update's groups (disjoint lists, each planned once), a per-parameter call in between (it works on the
     * bucket's views) and a whole-list call after them (planned anew from the groups' states) give the same bits.
     */
    @Test
    void groupsAndMixedCallsEqualPerParameter() {
        byte[] perParameter = run(false, 6, (r, o) -> { }, (run, opt, g, t) -> run.perParameter(opt, g, all()));
        List<Integer> even = List.of(0, 2, 4, 6, 8);
        List<Integer> odd = List.of(1, 3, 5, 7);
        byte[] mixed = run(false, 6, (r, o) -> { }, (run, opt, g, t) -> {
            if (t < 4) {
                run.bucketed(opt, g, odd);
                if (t == 2) {
                    run.perParameter(opt, g, even);
                } else {
                    run.bucketed(opt, g, even);
                }
            } else {
                run.bucketed(opt, g, all());
            }
        });
        assertArrayEquals(perParameter, mixed);
    }

    /**
     * A restore replaces the members' states: the buckets are planned again from the restored arrays and the run goes
     * on as the uninterrupted one. The restoring run first takes three different steps (gradients doubled), so its
     * state and weights differ until the restore of the straight run's state and weights after its third step.
     */
    @Test
    void restoreReplansAndContinuesBitForBit() {
        List<NDList> saved = new ArrayList<>();
        List<byte[]> weights = new ArrayList<>();
        try (NDManager keep = NDManager.newBaseManager()) {
            byte[] straight = run(false, 6, (r, o) -> { }, (run, opt, g, t) -> {
                run.bucketed(opt, g, all());
                if (t == 2) {
                    for (int i = 0; i < SHAPES.length; i++) {
                        saved.add(opt.saveState(run.ids.get(i), keep));
                        weights.add(run.masters.get(i).toByteArray());
                    }
                }
            });
            byte[] restored = run(false, 6, (r, o) -> { }, (run, opt, g, t) -> {
                if (t < 3) {
                    for (NDArray a : g) {
                        a.muli(2);
                    }
                }
                if (t == 3) {
                    for (int i = 0; i < SHAPES.length; i++) {
                        opt.restoreState(run.ids.get(i), run.ids.get(i), saved.get(i), run.masters.get(i));
                        try (NDArray w = run.m.create(java.nio.ByteBuffer.wrap(weights.get(i)), SHAPES[i],
                                DataType.FLOAT32)) {
                            run.masters.get(i).set(new NDIndex("..."), w);
                            if (run.copies.get(i) != null) {
                                try (NDArray h = w.toType(DataType.FLOAT16, false)) {
                                    run.copies.get(i).set(new NDIndex("..."), h);
                                }
                            }
                        }
                    }
                }
                run.bucketed(opt, g, all());
            });
            assertArrayEquals(straight, restored);
        }
    }

    /**
     * Step counts that differ within a bucket (a member updated once more, as a restored checkpoint may hold): the
     * bucket's members are updated one by one, each with its own count, as the per-parameter run does.
     */
    @Test
    void differingStepCountsFallBackToPerParameter() {
        UpdateKind extra = (run, opt, g, t) -> {
            if (t == 0) {
                run.perParameter(opt, g, List.of(2)); // p2, in a bucket with p0, one step ahead from here on
            }
        };
        byte[] perParameter = run(false, 4, (r, o) -> { }, (run, opt, g, t) -> {
            extra.apply(run, opt, g, t);
            run.perParameter(opt, g, all());
        });
        byte[] bucketed = run(false, 4, (run, opt) -> {
            assertEquals(5, opt.stepCount("p2"));
            assertEquals(4, opt.stepCount("p0"));
        }, (run, opt, g, t) -> {
            extra.apply(run, opt, g, t);
            run.bucketed(opt, g, all());
        });
        assertArrayEquals(perParameter, bucketed);
    }

    /**
     * {@link StatefulOptimizer#updateAll} with adamw8bit takes the buckets when bucketed (the GPU form, here forced by
     * {@code optWholeParameter}) and gives the bits of its per-parameter updates; its state is the 8-bit one.
     */
    @Test
    void statefulOptimizerUpdateAllUsesTheBuckets() {
        byte[][] out = new byte[2][];
        for (int v = 0; v < 2; v++) {
            try (NDManager m = NDManager.newBaseManager();
                    StatefulOptimizer opt = StatefulOptimizer.builder().setManager(m)
                            .optKind(StatefulOptimizer.Kind.ADAMW8BIT).optLearningRate(2e-3f).optWeightDecay(0.01f)
                            .optEightBit(256, 512).optWholeParameter(v == 1).build()) {
                Run run = new Run(m);
                for (int t = 0; t < 3; t++) {
                    try (NDManager step = m.newSubManager()) {
                        List<NDArray> grads = run.grads();
                        for (NDArray g : grads) {
                            g.attach(step);
                        }
                        opt.updateAll(run.ids, run.masters, grads, SCALE, run.copies);
                    }
                }
                ByteArrayOutputStream b = new ByteArrayOutputStream();
                for (int i = 0; i < SHAPES.length; i++) {
                    b.writeBytes(run.masters.get(i).toByteArray());
                    for (NDArray a : opt.stateArrays(run.ids.get(i)).values()) {
                        b.writeBytes(a.toByteArray());
                    }
                    assertEquals(3, opt.stepCount(run.ids.get(i)));
                }
                assertTrue(opt.stateArrays("p0").containsKey("exp_avg.code"));
                assertEquals(v == 1 ? 3 : 0, opt.eightBit().bucketCount(run.ids), "buckets");
                out[v] = b.toByteArray();
            }
        }
        assertArrayEquals(out[0], out[1]);
    }

    /** Buckets allocate nothing that outlives a step: as many arrays under the manager after 30 steps as after 1. */
    @Test
    void memoryStaysFlatWithBuckets() {
        try (NDManager m = NDManager.newBaseManager(); EightBitAdamW opt = builder(m).build()) {
            Run run = new Run(m);
            int after1 = -1;
            for (int t = 0; t < 30; t++) {
                try (NDManager step = m.newSubManager()) {
                    List<NDArray> grads = run.grads();
                    for (NDArray g : grads) {
                        g.attach(step);
                    }
                    run.bucketed(opt, grads, all());
                }
                if (t == 0) {
                    after1 = m.getManagedArrays().size();
                }
            }
            assertEquals(after1, m.getManagedArrays().size());
        }
    }
}
