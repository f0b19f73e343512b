package ai.djl.memopt.checkpoint;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.ParameterStore;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * A segment back-propagated again at a listener's request ({@link SegmentListener}): the gradients come out as if the
 * retried segment and every segment visited after it had been back-propagated once with their upstream gradients
 * times the factor, the others once as usual. A leaf gradient the failed attempt reached and the collector did not put
 * back would count it one and a half times; the expectations are exact multiples (0.5 is exact in float).
 */
class SegmentRetryTest {

    private static NDManager manager;

    @BeforeAll
    static void setUp() {
        manager = NDManager.newBaseManager();
    }

    @AfterAll
    static void tearDown() {
        manager.close();
    }

    /** Gradients by parameter path (and "input"), and the input's gradient after each listener call. */
    private record Run(Map<String, float[]> grads, List<float[]> inputAfterEach, long recomputed, long retried) {}

    /**
     * Forward and backward of {@code model}'s loss through a checkpointing collector whose listener asks, on the first
     * attempt of the segment of child {@code retryChild} (-1: none), for a retry at {@code factor} after zeroing that child's
     * parameter gradients (what a fused update does with the parameters it owns).
     */
    private static Run run(Block model, NDArray x, NDArray w, int retryChild, float factor) {
        for (Parameter p : model.getParameters().values()) {
            JniUtils.zeroGrad((PtNDArray) p.getArray());
        }
        List<Block> children = new ArrayList<>();
        for (Block c : model.getChildren().values()) {
            children.add(c instanceof CheckpointBlock ? ((CheckpointBlock) c).delegate() : c);
        }
        try (NDManager step = manager.newSubManager()) {
            NDArray input = x.duplicate();
            input.attach(step);
            input.setRequiresGradient(true);
            List<float[]> inputAfterEach = new ArrayList<>();
            SegmentListener listener = new SegmentListener() {
                @Override
                public Verdict segmentDone(Event e) {
                    try (NDArray g = JniUtils.getGradient((PtNDArray) input)) {
                        inputAfterEach.add(g == null ? null : g.toFloatArray());
                    }
                    int child = e.isHead() ? -1 : children.indexOf(e.blocks().get(0));
                    if (!e.isHead() && child == retryChild && e.attempt() == 0) {
                        for (Parameter p : e.blocks().get(0).getParameters().values()) {
                            JniUtils.zeroGrad((PtNDArray) p.getArray());
                        }
                        inputAfterEach.remove(inputAfterEach.size() - 1); // the failed attempt's
                        return Verdict.retry(factor);
                    }
                    return Verdict.CONTINUE;
                }

                @Override
                public boolean mayRetry() {
                    return true;
                }
            };
            long recomputed;
            long retried;
            try (CheckpointingGradientCollector gc = CheckpointingGradientCollector.open(manager)) {
                gc.setSegmentListener(listener);
                gc.markLeaf(input);
                NDArray out = model.forward(new ParameterStore(step, false), new NDList(input), true).head();
                gc.backward(out.mul(w).mean().add(out.square().mean()));
                recomputed = gc.recomputedSegments();
                retried = gc.retriedSegments();
            }
            Map<String, float[]> grads = new LinkedHashMap<>();
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(model).entrySet()) {
                try (NDArray g = e.getValue().getArray().getGradient()) {
                    grads.put(e.getKey(), g.toFloatArray());
                }
            }
            grads.put("input", input.getGradient().toFloatArray());
            return new Run(grads, inputAfterEach, recomputed, retried);
        }
    }

    private static void assertScaled(float[] expected, float factor, float[] actual, String what) {
        assertEquals(expected.length, actual.length, what);
        double max = 0;
        for (float e : expected) {
            max = Math.max(max, Math.abs(e));
        }
        assertTrue(max > 1e-4, what + ": reference gradient is not trivially zero");
        for (int i = 0; i < expected.length; i++) {
            assertEquals(expected[i] * factor, actual[i], 1e-6 * Math.max(1, max), what + "[" + i + "]");
        }
    }

    private static Block init(Block block, Shape shape) {
        Engine.getInstance().setRandomSeed(17);
        block.initialize(manager, DataType.FLOAT32, shape);
        return block;
    }

    private static NDArray random(Shape shape, int seed) {
        Engine.getInstance().setRandomSeed(seed);
        return manager.randomNormal(shape);
    }

    /**
     * A chain of Linear layers, each checkpointed, with tanh between them outside the segments (each segment's input
     * carries a graph back to the previous segment's output) or inside them (the input is that output's leaf).
     */
    @Test
    void aRetriedSegmentScalesItselfAndWhatItFeeds() {
        Shape shape = new Shape(5, 7);
        for (CheckpointPolicy policy : List.of(CheckpointPolicy.all(),
                CheckpointPolicy.matching((name, block) -> block instanceof Linear))) {
            Block mlp = init(CheckpointTestModels.mlp(), shape);
            Checkpointing.wrapChildren(mlp, policy, true);
            NDArray x = random(shape, 3);
            NDArray w = random(new Shape(5, 4), 4);
            Run ref = run(mlp, x, w, -1, 1f);
            assertEquals(0, ref.retried());
            int n = mlp.getChildren().size();
            List<Integer> linear = new ArrayList<>();
            for (int i = 0; i < n; i++) {
                if (BlockTrees.parameters(mlp.getChildren().get(i).getValue()).size() > 0) {
                    linear.add(i);
                }
            }
            for (int k : List.of(linear.get(0), linear.get(2), linear.get(linear.size() - 1))) {
                Run r = run(mlp, x, w, k, 0.5f);
                assertEquals(1, r.retried());
                assertEquals(ref.recomputed() + 1, r.recomputed(), "the retried segment recomputed once more");
                for (String name : ref.grads().keySet()) {
                    int child = name.equals("input") ? -1 : Integer.parseInt(name.substring(0, name.indexOf('.')));
                    float factor = child > k ? 1f : 0.5f; // visited before the retried segment: untouched
                    assertScaled(ref.grads().get(name), factor, r.grads().get(name),
                            policy + ", retry of child " + k + ": " + name);
                }
            }
        }
    }

    /**
     * Layers on a residual stream (the additions outside the segments): every segment's backward also reaches the
     * outputs of the segments still to visit and the input, which already hold gradients from the head and the later
     * layers; a retry must put those back, not zero or keep them. Every gradient is affine in the retry factor
     * {@code f} (what flows through the retried segment's backward is scaled, the rest is not): {@code G(f) = A + f B},
     * so {@code G(1) - G(1/2) = 2 (G(1/2) - G(1/4))} exactly, which a gradient left over from the failed attempt, or a
     * gradient from before it that was lost, breaks. The retried layer's own parameters get {@code f} times theirs, the
     * layers visited before it theirs.
     */
    @Test
    void aRetryPutsBackGradientsThatExistedBeforeIt() {
        Shape shape = new Shape(4, CheckpointTestModels.WIDTH);
        Block stack = init(new CheckpointTestModels.ResidualStack(4), shape);
        Checkpointing.wrapChildren(stack, CheckpointPolicy.all());
        NDArray x = random(shape, 5);
        NDArray w = random(shape, 6);
        Run ref = run(stack, x, w, -1, 1f);
        for (int k = 0; k < 4; k++) {
            Run half = run(stack, x, w, k, 0.5f);
            Run quarter = run(stack, x, w, k, 0.25f);
            for (String name : ref.grads().keySet()) {
                float[] g1 = ref.grads().get(name);
                float[] g2 = half.grads().get(name);
                float[] g4 = quarter.grads().get(name);
                float[] lhs = new float[g1.length];
                float[] rhs = new float[g1.length];
                boolean moved = false;
                for (int i = 0; i < g1.length; i++) {
                    lhs[i] = g1[i] - g2[i];
                    rhs[i] = 2 * (g2[i] - g4[i]);
                    moved |= Math.abs(lhs[i]) > 1e-4;
                }
                int child = name.equals("input") ? -1 : Integer.parseInt(name.substring(0, name.indexOf('.')));
                assertTrue(moved == child <= k, "retry of layer " + k + ": " + name + " changed: " + moved);
                if (moved) {
                    assertEquals(lhs.length, rhs.length);
                    for (int i = 0; i < lhs.length; i++) {
                        assertEquals(lhs[i], rhs[i], 1e-5 * Math.max(1, Math.abs(g1[i])),
                                "retry of layer " + k + ": " + name + "[" + i + "] not affine in the factor");
                    }
                }
                if (child == k) {
                    assertScaled(g1, 0.5f, g2, "retry of layer " + k + ": its own " + name);
                }
            }
        }
    }

    /** A retry asked after the target's own backward, or by a listener that said it never retries, is refused. */
    @Test
    void retriesOnlyWhereTheListenerSaidSo() {
        Shape shape = new Shape(5, 7);
        Block mlp = init(CheckpointTestModels.mlp(), shape);
        Checkpointing.wrapChildren(mlp, CheckpointPolicy.all(), true);
        for (boolean head : new boolean[] {true, false}) {
            try (NDManager step = manager.newSubManager();
                    CheckpointingGradientCollector gc = CheckpointingGradientCollector.open(manager)) {
                gc.setSegmentListener(e -> e.isHead() == head ? SegmentListener.Verdict.retry(0.5f)
                        : SegmentListener.Verdict.CONTINUE);
                NDArray out = mlp.forward(new ParameterStore(step, false), new NDList(random(shape, 3)), true).head();
                IllegalStateException e = assertThrows(IllegalStateException.class, () -> gc.backward(out.sum()));
                assertTrue(e.getMessage().contains(head ? "target's own backward" : "mayRetry() is false"),
                        e.getMessage());
            }
        }
    }
}
