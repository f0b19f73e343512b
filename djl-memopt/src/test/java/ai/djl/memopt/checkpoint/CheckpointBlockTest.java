package ai.djl.memopt.checkpoint;

import static ai.djl.memopt.checkpoint.CheckpointTestModels.gradients;
import static ai.djl.memopt.checkpoint.CheckpointTestModels.maxAbs;
import static ai.djl.memopt.checkpoint.CheckpointTestModels.maxAbsDiff;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
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
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.nn.norm.Dropout;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.util.List;
import java.util.Map;
import java.util.function.Supplier;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

class CheckpointBlockTest {

    /**
     * 1e-6 absolute for gradients up to 1, relative to the largest gradient above: checkpointing sums the same
     * contributions in another order, which moves a float32 gradient of 16 by one ulp (1.9e-6).
     */
    private static final double TOL = 1e-6;

    private static void assertClose(Map<String, float[]> expected, Map<String, float[]> actual, String what) {
        double scale = Math.max(1, maxAbs(expected));
        double diff = maxAbsDiff(expected, actual);
        assertTrue(maxAbs(expected) > 1e-2, "reference gradients are not trivially zero");
        assertTrue(diff <= TOL * scale, what + ": max abs diff " + diff + ", largest gradient " + maxAbs(expected));
    }
    private static NDManager manager;

    @BeforeAll
    static void setUp() {
        manager = NDManager.newBaseManager();
    }

    @AfterAll
    static void tearDown() {
        manager.close();
    }

    private static Supplier<GradientCollector> plain() {
        return () -> manager.getEngine().newGradientCollector();
    }

    private static Supplier<GradientCollector> checkpointing() {
        return () -> CheckpointingGradientCollector.open(manager);
    }

    /** A checkpointing collector that leaves itself in {@code opened[0]}, to be asked after the run. */
    private static Supplier<GradientCollector> keeping(CheckpointingGradientCollector[] opened) {
        return () -> opened[0] = CheckpointingGradientCollector.open(manager);
    }

    private static Block init(Block block, Shape shape, int seed) {
        Engine.getInstance().setRandomSeed(seed);
        block.initialize(manager, DataType.FLOAT32, shape);
        return block;
    }

    private static NDArray input(Shape shape, boolean requiresGrad, int seed) {
        Engine.getInstance().setRandomSeed(seed);
        NDArray x = manager.randomNormal(shape);
        x.setRequiresGradient(requiresGrad);
        return x;
    }

    private static List<CheckpointPolicy> policies() {
        return List.of(
                CheckpointPolicy.all(),
                CheckpointPolicy.everyNth(2),
                CheckpointPolicy.everyNth(3),
                CheckpointPolicy.sqrtN(),
                CheckpointPolicy.matching((name, block) -> block instanceof Linear));
    }

    @Test
    void mlpGradientsMatchForEveryPolicy() {
        Shape shape = new Shape(5, 7);
        for (boolean inputGrad : new boolean[] {true, false}) {
            for (CheckpointPolicy policy : policies()) {
                SequentialBlock mlp = (SequentialBlock) init(CheckpointTestModels.mlp(), shape, 11);
                NDArray x = input(shape, inputGrad, 3);
                NDArray w = input(new Shape(5, 4), false, 4);
                Map<String, float[]> expected = gradients(mlp, manager, x, w, plain());
                List<String> wrapped = Checkpointing.wrapChildren(mlp, policy, true);
                assertFalse(wrapped.isEmpty());
                Map<String, float[]> actual = gradients(mlp, manager, x, w, checkpointing());
                assertEquals(inputGrad, actual.containsKey("input"));
                assertClose(expected, actual, "policy wrapping " + wrapped + ", input grad " + inputGrad);
            }
        }
    }

    @Test
    void residualStackGradientsMatch() {
        Shape shape = new Shape(4, CheckpointTestModels.WIDTH);
        List<CheckpointPolicy> perChild = List.of(
                CheckpointPolicy.all(), CheckpointPolicy.everyNth(2),
                CheckpointPolicy.matching((name, block) -> !name.equals("1")));
        for (CheckpointPolicy policy : perChild) {
            Block stack = init(new CheckpointTestModels.ResidualStack(5), shape, 21);
            NDArray x = input(shape, true, 5);
            NDArray w = input(shape, false, 6);
            Map<String, float[]> expected = gradients(stack, manager, x, w, plain());
            Checkpointing.wrapChildren(stack, policy);
            Map<String, float[]> actual = gradients(stack, manager, x, w, checkpointing());
            assertClose(expected, actual, "policy " + policy);
        }
    }

    @Test
    void nestedCheckpointsGiveTheSameGradients() {
        Shape shape = new Shape(4, CheckpointTestModels.WIDTH);
        for (boolean inputGrad : new boolean[] {true, false}) {
            Block stack = init(new CheckpointTestModels.ResidualStack(3), shape, 23);
            NDArray x = input(shape, inputGrad, 9);
            NDArray w = input(shape, false, 10);
            Map<String, float[]> expected = gradients(stack, manager, x, w, plain());
            // each layer (Linear, tanh, Linear) checkpointed, and inside it both Linears on their own
            List<String> layers = Checkpointing.wrapChildren(stack, CheckpointPolicy.all());
            for (String layer : layers) {
                Checkpointing.wrapChildren(stack, layer, CheckpointPolicy.matching((n, b) -> b instanceof Linear));
            }
            CheckpointingGradientCollector[] gc = new CheckpointingGradientCollector[1];
            Map<String, float[]> actual = gradients(stack, manager, x, w, keeping(gc));
            assertClose(expected, actual, "nested, input grad " + inputGrad);
            // the 3 layers in the forward, then 2 Linears in each layer's recomputation
            assertEquals(3 + 3 * 2, gc[0].recordedSegments(), "segments recorded");
            assertEquals(0, gc[0].pendingSegments());
        }
    }

    @Test
    void sqrtScheduleNeedsASequentialParent() {
        Block stack = init(new CheckpointTestModels.ResidualStack(4), new Shape(2, CheckpointTestModels.WIDTH), 1);
        IllegalArgumentException e = assertThrows(
                IllegalArgumentException.class, () -> Checkpointing.wrapChildren(stack, CheckpointPolicy.sqrtN()));
        assertTrue(e.getMessage().contains("SequentialBlock"), e.getMessage());
    }

    @Test
    void sqrtScheduleGroupsChildren() {
        SequentialBlock mlp = CheckpointTestModels.mlp(); // 9 children -> runs of 3
        List<CheckpointPolicy.Range> plan = CheckpointPolicy.sqrtN().plan(BlockTrees.childNames(mlp),
                mlp.getChildren().values());
        assertEquals(List.of(new CheckpointPolicy.Range(0, 3), new CheckpointPolicy.Range(3, 6),
                new CheckpointPolicy.Range(6, 9)), plan);
    }

    @Test
    void sharedInputAndSharedParameterGradientsMatch() {
        Shape shape = new Shape(3, 6);
        for (boolean inputGrad : new boolean[] {true, false}) {
            Block model = init(new CheckpointTestModels.Branches(), shape, 31);
            NDArray x = input(shape, inputGrad, 7);
            NDArray w = input(new Shape(3, CheckpointTestModels.WIDTH), false, 8);
            Map<String, float[]> expected = gradients(model, manager, x, w, plain());
            // stem stays plain, so h carries a graph into three segments; `shared` is two segments of one block
            Checkpointing.wrapChildren(model, CheckpointPolicy.matching((name, b) -> !name.equals("stem")));
            assertInstanceOf(CheckpointBlock.class, ((CheckpointTestModels.Branches) model).shared);
            CheckpointingGradientCollector[] gc = new CheckpointingGradientCollector[1];
            Map<String, float[]> actual = gradients(model, manager, x, w, keeping(gc));
            assertClose(expected, actual, "branches, input grad " + inputGrad);
            // h's graph is shared by left, right and shared(h), and tanh(shared(h)) has one too: every segment but
            // the last visited must keep the graph for the visits after it
            assertEquals(3, gc[0].retainedSegmentBackwards(), "segments back-propagated with retain_graph, stem plain");
            // also with the stem checkpointed: the first segment then reads the raw input
            Checkpointing.wrapChildren(model, CheckpointPolicy.matching((name, b) -> name.equals("stem")));
            Map<String, float[]> all = gradients(model, manager, x, w, keeping(gc));
            assertClose(expected, all, "all branches");
            // h is now the stem's output, which has no graph behind it; only shared(tanh(..)) reads a computed
            // input, and nothing is visited after the graph it shares with no other segment
            assertEquals(0, gc[0].retainedSegmentBackwards(), "segments back-propagated with retain_graph, stem checkpointed");
        }
    }

    @Test
    void parameterPathsAreUnchangedByWrapping() {
        Block model = init(new CheckpointTestModels.Branches(), new Shape(3, 6), 1);
        List<String> before = List.copyOf(BlockTrees.parameters(model).keySet());
        Checkpointing.wrapChildren(model, CheckpointPolicy.all());
        assertEquals(before, List.copyOf(BlockTrees.parameters(model).keySet()));
        assertEquals(List.of("stem", "left", "right", "shared"), BlockTrees.childNames(model));
        assertTrue(before.contains("shared.weight"), before.toString());
        assertThrows(IllegalArgumentException.class, () -> Checkpointing.wrapChildren(model, CheckpointPolicy.all()));
    }

    @Test
    void segmentsKeepOnlyTheirBoundariesAndReleaseThemAfterBackward() {
        Shape shape = new Shape(5, CheckpointTestModels.WIDTH);
        Block stack = init(new CheckpointTestModels.ResidualStack(4), shape, 11);
        int plainArrays;
        try (NDManager step = manager.newSubManager()) {
            NDArray x = step.randomNormal(shape);
            int before = step.getManagedArrays().size();
            stack.forward(new ParameterStore(step, false), new NDList(x), true);
            plainArrays = step.getManagedArrays().size() - before;
        }
        Checkpointing.wrapChildren(stack, CheckpointPolicy.all());
        try (NDManager step = manager.newSubManager()) {
            NDArray x = step.randomNormal(shape);
            ParameterStore ps = new ParameterStore(step, false);
            try (CheckpointingGradientCollector gc = CheckpointingGradientCollector.open(manager)) {
                int before = step.getManagedArrays().size();
                NDArray out = stack.forward(ps, new NDList(x), true).head();
                // per layer: the residual sum (the caller's) and 3 handles of the segment (its output leaf, the view
                // returned to the caller, an alias of its input) that share the storage of one output and one input;
                // none of the layer's 3 internal activations (linear, tanh, linear) survives
                int checkpointed = step.getManagedArrays().size() - before;
                assertEquals(4 * 4, checkpointed);
                assertEquals(4 * 4, plainArrays, "plain: 3 internal activations + the residual sum per layer");
                assertEquals(4, gc.pendingSegments());
                NDArray loss = out.sum();
                gc.backward(loss);
                assertEquals(0, gc.pendingSegments());
                // the segments released their handles; what is left belongs to the caller (sums, views, loss)
                assertEquals(before + 4 * 2 + 1, step.getManagedArrays().size());
            }
        }
    }

    @Test
    void replacingABlockBelowADecoratorChangesWhatRuns() {
        Shape shape = new Shape(2, CheckpointTestModels.WIDTH);
        Block stack = init(new CheckpointTestModels.ResidualStack(3), shape, 3);
        Checkpointing.wrapChildren(stack, CheckpointPolicy.all());
        ParameterStore ps = new ParameterStore(manager, false);
        NDArray x = input(shape, false, 1);
        float[] before = stack.forward(ps, new NDList(x), false).head().toFloatArray();
        // "1.2" is the second Linear inside the checkpointed layer 1: the path goes through the decorator
        Block zero = new ai.djl.nn.LambdaBlock(a -> new NDList(a.head().mul(0)));
        BlockTrees.replace(stack, "1.2", old -> zero);
        assertTrue(BlockTrees.get(stack, "1.2") == zero);
        assertInstanceOf(CheckpointBlock.class, BlockTrees.get(stack, "1"));
        assertTrue(((CheckpointBlock) BlockTrees.get(stack, "1")).delegate().getChildren().valueAt(2) == zero,
                "the wrapped block that runs was edited");
        float[] after = stack.forward(ps, new NDList(x), false).head().toFloatArray();
        assertFalse(java.util.Arrays.equals(before, after), "the replacement runs");

        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> Checkpointing.wrapChildren(new CheckpointTestModels.ResidualStack(3), (names, children) -> List.of(
                        new CheckpointPolicy.Range(1, 2), new CheckpointPolicy.Range(1, 2))));
        assertTrue(e.getMessage().contains("non-overlapping"), e.getMessage());
        assertThrows(IllegalArgumentException.class, () -> CheckpointPolicy.everyNth(0));
        assertThrows(IllegalArgumentException.class, () -> CheckpointBlock.builder().build());
    }

    @Test
    void inferenceAndEvaluationJustForward() {
        Shape shape = new Shape(2, 7);
        SequentialBlock mlp = (SequentialBlock) init(CheckpointTestModels.mlp(), shape, 11);
        NDArray x = input(shape, false, 1);
        ParameterStore ps = new ParameterStore(manager, false);
        float[] expected = mlp.forward(ps, new NDList(x), false).head().toFloatArray();
        Checkpointing.wrapChildren(mlp, CheckpointPolicy.sqrtN());
        float[] actual = mlp.forward(ps, new NDList(x), false).head().toFloatArray();
        assertEquals(expected.length, actual.length);
        for (int i = 0; i < expected.length; i++) {
            assertEquals(expected[i], actual[i], 0f);
        }
    }

    @Test
    void dropoutIsCaughtByTheDeterminismCheck() {
        Shape shape = new Shape(8, 7);
        SequentialBlock model = new SequentialBlock()
                .add(Linear.builder().setUnits(16).build())
                .add(Dropout.builder().optRate(0.5f).build())
                .add(Linear.builder().setUnits(4).build());
        init(model, shape, 2);
        Checkpointing.wrapChildren(model, CheckpointPolicy.all(), true);
        NDArray x = input(shape, false, 1);
        NDArray w = input(new Shape(8, 4), false, 2);
        NonDeterministicRecomputationException e = assertThrows(
                NonDeterministicRecomputationException.class,
                () -> gradients(model, manager, x, w, checkpointing()));
        assertTrue(e.getMessage().contains("'1'") && e.getMessage().contains("dropout"), e.getMessage());
        assertFalse(JniUtils.isGradMode() && CheckpointingGradientCollector.active() != null);
        assertEquals(null, CheckpointingGradientCollector.active(), "the collector was closed");
    }

    @Test
    void onlyOneCollectorAtATime() {
        boolean gradMode = JniUtils.isGradMode();
        try (GradientCollector plain = manager.getEngine().newGradientCollector()) {
            IllegalStateException e = assertThrows(
                    IllegalStateException.class, () -> CheckpointingGradientCollector.open(manager));
            assertTrue(e.getMessage().contains("another GradientCollector"), e.getMessage());
        }
        assertEquals(gradMode, JniUtils.isGradMode());
        try (GradientCollector gc = CheckpointingGradientCollector.open(manager)) {
            assertThrows(IllegalStateException.class, () -> manager.getEngine().newGradientCollector());
        }
        // and it can be opened again after close
        CheckpointingGradientCollector.open(manager).close();
    }
}
