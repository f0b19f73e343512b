package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Model;
import ai.djl.engine.Engine;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.training.DefaultTrainingConfig;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import ai.djl.training.Trainer;
import ai.djl.training.loss.Loss;
import ai.djl.training.optimizer.Optimizer;
import ai.djl.training.tracker.Tracker;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

class LoraLinearTest {

    private static NDArray forward(Block block, NDManager m, NDArray x, boolean training) {
        return block.forward(new ParameterStore(m, false), new NDList(x), training).singletonOrThrow();
    }

    private static float maxAbsDiff(NDArray a, NDArray b) {
        return a.toType(DataType.FLOAT32, false).sub(b.toType(DataType.FLOAT32, false)).abs().max().getFloat();
    }

    /** Gives every adapter a nonzero B so the adapters change the outputs. */
    private static void randomizeB(Block root, NDManager m, float std) {
        for (LoraLinear l : Lora.adapters(root).values()) {
            NDArray b = m.randomNormal(0, std, l.loraB().getArray().getShape(), DataType.FLOAT32);
            l.setAdapterWeights(l.loraA().getArray(), b);
        }
    }

    @Test
    void freshAdapterLeavesOutputsExactlyUnchanged() {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(1);
            SequentialBlock mlp = ToyBlocks.mlp(m, 16, 32, 8, DataType.FLOAT32);
            NDArray x = m.randomNormal(new Shape(3, 5, 16));
            float[] before = forward(mlp, m, x, false).toFloatArray();

            LoraReport report = Lora.apply(mlp, LoraConfig.builder().setRank(4).optTargetModules("0", "2").build());
            assertEquals(List.of("0", "2"), report.wrappedPaths());
            assertEquals(4 * 16 + 32 * 4 + 4 * 32 + 8 * 4, report.trainableParameters());
            assertEquals(16 * 32 + 32 + 32 * 8 + report.trainableParameters(), report.totalParameters());
            LoraLinear first = (LoraLinear) BlockTrees.get(mlp, "0");
            float bound = (float) (1 / Math.sqrt(16));
            NDArray a = first.loraA().getArray();
            assertTrue(a.abs().max().getFloat() <= bound, "kaiming-uniform(a=sqrt 5) bound 1/sqrt(in)");
            assertTrue(a.abs().max().getFloat() > 0.5f * bound, "A is random, not zero");
            assertEquals(0f, first.loraB().getArray().abs().max().getFloat());

            assertArrayEquals(before, forward(mlp, m, x, false).toFloatArray(), 0f);
            assertArrayEquals(before, forward(mlp, m, x, true).toFloatArray(), 0f);
            // PEFT names: the base is base_layer, the adapter weights lora_A.weight / lora_B.weight
            assertEquals(List.of("0.lora_A.weight", "0.lora_B.weight", "0.base_layer.weight", "0.base_layer.bias",
                    "2.lora_A.weight", "2.lora_B.weight", "2.base_layer.weight"),
                    List.copyOf(BlockTrees.parameters(mlp).keySet()));
        }
    }

    @Test
    void forwardAndGradientsMatchHandComputedLora() {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(2);
            SequentialBlock root = new SequentialBlock().add(ToyBlocks.linear(m, 12, 6, DataType.FLOAT32));
            Lora.apply(root, LoraConfig.builder().setRank(3).optAlpha(6).optTargetModules("0").build());
            randomizeB(root, m, 0.5f);
            LoraLinear lora = (LoraLinear) BlockTrees.get(root, "0");
            NDArray w = ((Linear) lora.base()).getParameters().get("weight").getArray(); // (6, 12)
            NDArray a = lora.loraA().getArray(); // (3, 12)
            NDArray b = lora.loraB().getArray(); // (6, 3)
            NDArray x = m.randomNormal(new Shape(4, 12));
            NDArray g = m.randomNormal(new Shape(4, 6));
            float s = 2f;

            NDArray expected = x.matMul(w.transpose()).add(x.matMul(a.transpose()).matMul(b.transpose()).mul(s));
            NDArray y;
            try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                y = forward(root, m, x, true);
                gc.backward(y.mul(g).sum());
            }
            assertTrue(maxAbsDiff(expected, y) < 1e-5f, "forward " + maxAbsDiff(expected, y));
            // L = sum(y * g): dB = s g^T (x A^T), dA = s (g B)^T x
            NDArray dB = g.transpose().matMul(x.matMul(a.transpose())).mul(s);
            NDArray dA = g.matMul(b).transpose().matMul(x).mul(s);
            assertTrue(maxAbsDiff(dB, b.getGradient()) < 1e-4f, "dB " + maxAbsDiff(dB, b.getGradient()));
            assertTrue(maxAbsDiff(dA, a.getGradient()) < 1e-4f, "dA " + maxAbsDiff(dA, a.getGradient()));
            assertFalse(w.hasGradient(), "the base weight is frozen");
        }
    }

    @Test
    void onlyAdaptersReceiveGradientsAndOptimizerUpdates() {
        try (NDManager m = NDManager.newBaseManager(); Model model = Model.newInstance("lora")) {
            Engine.getInstance().setRandomSeed(3);
            SequentialBlock mlp = ToyBlocks.mlp(m, 16, 32, 8, DataType.FLOAT32);
            Lora.apply(mlp, LoraConfig.builder().setRank(4).optTargetModules("0", "2").build());
            Map<String, float[]> before = new LinkedHashMap<>();
            BlockTrees.parameters(mlp).forEach((k, p) -> before.put(k, p.getArray().toFloatArray()));
            model.setBlock(mlp);
            NDArray x = m.randomNormal(new Shape(6, 16));
            NDArray target = m.randomNormal(new Shape(6, 8));
            DefaultTrainingConfig cfg = new DefaultTrainingConfig(Loss.l2Loss())
                    .optOptimizer(Optimizer.sgd().setLearningRateTracker(Tracker.fixed(0.5f)).build());
            try (Trainer trainer = model.newTrainer(cfg)) {
                try (GradientCollector gc = trainer.newGradientCollector()) {
                    NDArray pred = trainer.forward(new NDList(x)).singletonOrThrow();
                    gc.backward(pred.sub(target).square().mean());
                }
                for (Map.Entry<String, Parameter> e : BlockTrees.parameters(mlp).entrySet()) {
                    NDArray arr = e.getValue().getArray();
                    boolean adapter = e.getKey().contains(".lora_");
                    assertEquals(adapter, e.getValue().requiresGradient(), e.getKey());
                    assertEquals(adapter, arr.hasGradient(), e.getKey());
                }
                // with B = 0 the first step moves B only; A's gradient is s (g B)^T x = 0
                assertTrue(((LoraLinear) BlockTrees.get(mlp, "2")).loraB().getArray().getGradient().abs().sum()
                        .getFloat() > 0);
                trainer.step();
            }
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(mlp).entrySet()) {
                float[] now = e.getValue().getArray().toFloatArray();
                if (e.getKey().contains(".lora_B")) {
                    assertFalse(java.util.Arrays.equals(before.get(e.getKey()), now), e.getKey() + " trained");
                } else {
                    assertArrayEquals(before.get(e.getKey()), now, 0f, e.getKey() + " unchanged");
                }
            }
        }
    }

    @Test
    void mergedModelMatchesAdaptedModel() {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(4);
            SequentialBlock mlp = ToyBlocks.mlp(m, 16, 32, 8, DataType.FLOAT32);
            NDArray x = m.randomNormal(new Shape(5, 16));
            NDArray base = forward(mlp, m, x, false);
            Lora.apply(mlp, LoraConfig.builder().setRank(4).optAlpha(16).optTargetModules("0", "2").build());
            randomizeB(mlp, m, 0.2f);
            NDArray adapted = forward(mlp, m, x, false);
            assertTrue(maxAbsDiff(base, adapted) > 1e-2f, "the adapters change the output");
            LoraLinear l0 = (LoraLinear) BlockTrees.get(mlp, "0");
            NDArray w0 = l0.weight(m);
            NDArray expectW0 = ((Linear) l0.base()).getParameters().get("weight").getArray()
                    .add(l0.loraB().getArray().matMul(l0.loraA().getArray()).mul(4f));
            assertTrue(maxAbsDiff(expectW0, w0) < 1e-6f);

            assertEquals(List.of("0", "2"), Lora.merge(mlp));
            assertTrue(BlockTrees.get(mlp, "0") instanceof Linear && BlockTrees.get(mlp, "2") instanceof Linear);
            assertEquals(List.of("0.weight", "0.bias", "2.weight"), List.copyOf(BlockTrees.parameters(mlp).keySet()));
            NDArray merged = forward(mlp, m, x, false);
            float diff = maxAbsDiff(adapted, merged);
            assertTrue(diff < 1e-5f, "merged vs adapted max abs diff " + diff);
            assertTrue(maxAbsDiff(w0, LinearWeightSource.weightOf(BlockTrees.get(mlp, "0"), m)) == 0f);
        }
    }

    @Test
    void halfPrecisionInputUsesCastAdapters() {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(5);
            SequentialBlock f32 = new SequentialBlock().add(ToyBlocks.linear(m, 32, 16, DataType.FLOAT32));
            SequentialBlock f16 = new SequentialBlock().add(ToyBlocks.linear(m, 32, 16, DataType.FLOAT16));
            NDArray w = BlockTrees.parameters(f32).get("0.weight").getArray();
            BlockTrees.parameters(f16).get("0.weight").getArray().intern(w.toType(DataType.FLOAT16, true));
            LoraConfig config = LoraConfig.builder().setRank(4).optTargetModules("0").build();
            Lora.apply(f32, config);
            Lora.apply(f16, config);
            randomizeB(f32, m, 0.3f);
            LoraLinear l32 = (LoraLinear) BlockTrees.get(f32, "0");
            LoraLinear l16 = (LoraLinear) BlockTrees.get(f16, "0");
            assertEquals(DataType.FLOAT32, l16.loraA().getArray().getDataType(), "adapters stay FP32");
            l16.setAdapterWeights(l32.loraA().getArray(), l32.loraB().getArray());

            NDArray x = m.randomNormal(new Shape(3, 32));
            NDArray y32 = forward(f32, m, x, false);
            try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                NDArray y16 = forward(f16, m, x.toType(DataType.FLOAT16, false), true);
                assertEquals(DataType.FLOAT16, y16.getDataType());
                float diff = maxAbsDiff(y32, y16);
                assertTrue(diff < 2e-2f, "fp16 vs fp32 max abs diff " + diff);
                gc.backward(LoraLinear.cast(y16, DataType.FLOAT32).sum()); // toType would cut the graph
            }
            NDArray gradB = l16.loraB().getArray().getGradient();
            assertEquals(DataType.FLOAT32, gradB.getDataType());
            // L = sum(y): dB = s 1^T (x A^T), computed here in FP32
            NDArray expectB = m.ones(new Shape(3, 16)).transpose()
                    .matMul(x.matMul(l16.loraA().getArray().transpose())).mul(2f);
            float err = maxAbsDiff(expectB, gradB);
            assertTrue(err < 2e-2f * expectB.abs().max().getFloat(), "gradients reach the FP32 adapter, err " + err);
            assertEquals(DataType.FLOAT16, l16.weight(m).getDataType());
        }
    }

    @Test
    void forwardLeavesNoTemporaries() {
        try (NDManager m = NDManager.newBaseManager()) {
            SequentialBlock plain = new SequentialBlock().add(ToyBlocks.linear(m, 8, 8, DataType.FLOAT32));
            SequentialBlock adapted = new SequentialBlock().add(ToyBlocks.linear(m, 8, 8, DataType.FLOAT32));
            Lora.apply(adapted, LoraConfig.builder().setRank(2).optTargetModules("0").build());
            int[] counts = new int[2];
            for (int i = 0; i < 2; i++) {
                try (NDManager step = m.newSubManager()) {
                    NDArray x = step.randomNormal(new Shape(2, 8));
                    int start = step.getManagedArrays().size();
                    forward(i == 0 ? plain : adapted, step, x, false);
                    counts[i] = step.getManagedArrays().size() - start;
                }
            }
            // the adapted forward leaves the base output and the sum, nothing else
            assertEquals(counts[0] + 1, counts[1]);
        }
    }

    @Test
    void stacksOnANonLinearWeightSourceAndMergesToFullPrecision() {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(6);
            ToyBlocks.Int8Linear quantized = new ToyBlocks.Int8Linear(ToyBlocks.linear(m, 24, 10, DataType.FLOAT32),
                    m.randomNormal(new Shape(10)));
            SequentialBlock root = new SequentialBlock().add(quantized);
            // the model's other arrays (none here) would own the adapters: give the manager explicitly
            Lora.apply(root, LoraConfig.builder().setRank(4).optTargetModules("0").build(), m);
            randomizeB(root, m, 0.3f);
            LoraLinear lora = (LoraLinear) BlockTrees.get(root, "0");
            assertEquals(24, lora.inFeatures());
            assertEquals(10, lora.outFeatures());
            NDArray x = m.randomNormal(new Shape(3, 24));
            NDArray y;
            try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                y = forward(root, m, x, true);
                gc.backward(y.sum());
            }
            assertTrue(lora.loraA().getArray().getGradient().abs().sum().getFloat() > 0);
            NDArray expectedW = ((LinearWeightSource) lora.base()).weight(m)
                    .add(lora.loraB().getArray().matMul(lora.loraA().getArray()).mul(2f));
            assertTrue(maxAbsDiff(expectedW, lora.weight(m)) < 1e-6f);

            Lora.merge(root);
            Block merged = BlockTrees.get(root, "0");
            assertTrue(merged instanceof Linear, "full-precision Linear, ready to be quantized again");
            assertEquals(DataType.FLOAT32, merged.getParameters().get("weight").getArray().getDataType());
            assertTrue(merged.getParameters().get("bias").isInitialized(), "the base's bias is carried over");
            assertTrue(quantized.released, "the quantized arrays are freed");
            float diff = maxAbsDiff(y, forward(root, m, x, false));
            assertTrue(diff < 1e-5f, "merged vs adapted " + diff);
        }
    }

    @Test
    void dropoutOnlyWhileTraining() {
        try (NDManager m = NDManager.newBaseManager()) {
            SequentialBlock root = new SequentialBlock().add(ToyBlocks.linear(m, 64, 8, DataType.FLOAT32));
            Lora.apply(root, LoraConfig.builder().setRank(4).optDropout(0.5f).optTargetModules("0").build());
            randomizeB(root, m, 1f);
            NDArray x = m.randomNormal(new Shape(4, 64));
            NDArray eval1 = forward(root, m, x, false);
            assertEquals(0f, maxAbsDiff(eval1, forward(root, m, x, false)));
            NDArray train = forward(root, m, x, true);
            assertNotEquals(0f, maxAbsDiff(eval1, train), "dropout active in training");
        }
    }

    @Test
    void builderAndApplyRejectBadInput() {
        try (NDManager m = NDManager.newBaseManager()) {
            SequentialBlock mlp = ToyBlocks.mlp(m, 4, 8, 2, DataType.FLOAT32);
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> Lora.apply(mlp, LoraConfig.builder().setRank(2).optTargetModules("q_proj").build()));
            assertTrue(e.getMessage().contains("no module matches") && e.getMessage().contains("[0, 2]"),
                    e.getMessage());
            e = assertThrows(IllegalArgumentException.class,
                    () -> Lora.apply(mlp, LoraConfig.builder().setRank(2).optTargetRegex("[0-9]").build()));
            assertTrue(e.getMessage().contains("'1'") && e.getMessage().contains("not a projection"), e.getMessage());
            Lora.apply(mlp, LoraConfig.builder().setRank(2).optTargetModules("0").build());
            e = assertThrows(IllegalArgumentException.class,
                    () -> Lora.apply(mlp, LoraConfig.builder().setRank(2).optTargetModules("0").build()));
            assertTrue(e.getMessage().contains("already has a LoRA adapter"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class,
                    () -> LoraConfig.builder().setRank(0).optTargetModules("x").build());
            assertTrue(e.getMessage().contains("rank must be positive, got 0"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class, () -> LoraConfig.builder().setRank(2).build());
            assertTrue(e.getMessage().contains("no targets"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class, () -> LoraConfig.builder().setRank(2)
                    .optTargetModules("x").optDataType(DataType.BFLOAT16).build());
            assertTrue(e.getMessage().contains("BFLOAT16"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class,
                    () -> ((LoraLinear) BlockTrees.get(mlp, "0")).setAdapterWeights(m.zeros(new Shape(3, 4)),
                            m.zeros(new Shape(8, 2))));
            assertTrue(e.getMessage().contains("lora_A must have shape (2, 4), got (3, 4)"), e.getMessage());
        }
    }

    @Test
    void targetMatchingFollowsPeft() {
        LoraConfig names = LoraConfig.builder().setRank(2).optTargetModules("q_a_proj", "self_attn.o_proj").build();
        assertTrue(names.matches("model.layers.0.self_attn.q_a_proj"));
        assertTrue(names.matches("q_a_proj"));
        assertFalse(names.matches("model.layers.0.self_attn.xq_a_proj"), "whole components only");
        assertTrue(names.matches("model.layers.3.self_attn.o_proj"));
        LoraConfig params = LoraConfig.builder().setRank(2).optTargetParameters("mlp.gate_proj.weight", "gate_up_proj")
                .optExcludeModules(List.of("gate_proj")).build();
        assertTrue(params.matchesParameter("model.layers.0.mlp.gate_proj.weight"));
        assertFalse(params.matchesParameter("model.layers.3.mlp.shared_experts.gate_proj.weight"));
        assertTrue(params.matchesParameter("model.layers.3.mlp.experts.gate_up_proj"), "exclude_modules ignored");
        assertFalse(params.matches("model.layers.0.mlp.gate_proj"), "not a module target");
        // PEFT's get_pattern_key: the first key matching the end of the name after a dot
        LoraConfig patterns = LoraConfig.builder().setRank(4).optAlpha(8).optTargetModules("o_proj")
                .optRankPattern(Map.of(".*\\.gate_up_proj", 8)).optAlphaPattern(Map.of("layers\\.1\\.self_attn\\.o_proj", 3f))
                .build();
        assertEquals(8, patterns.rankFor("model.layers.3.mlp.experts.gate_up_proj"));
        assertEquals(4, patterns.rankFor("model.layers.3.mlp.experts.gate_up_projx"));
        assertEquals(4, patterns.rankFor("model.layers.3.mlp.experts.down_proj"));
        assertEquals(3f, patterns.alphaFor("model.layers.1.self_attn.o_proj"));
        assertEquals(8f, patterns.alphaFor("model.layers.11.self_attn.o_proj"), "whole components only");
        LoraConfig regex = LoraConfig.builder().setRank(2).optTargetRegex(".*layers\\.[01]\\..*_proj")
                .optExcludeModules(List.of("o_proj")).build();
        assertTrue(regex.matches("model.layers.1.self_attn.q_b_proj"));
        assertFalse(regex.matches("model.layers.2.self_attn.q_b_proj"));
        assertFalse(regex.matches("model.layers.1.self_attn.o_proj"), "excluded");
        assertFalse(regex.matches("layers.1.self_attn.q_b_proj.extra"), "regex must match the whole path");
    }

    @Test
    void aSecondApplyKeepsEarlierAdaptersTrainable() {
        try (NDManager m = NDManager.newBaseManager()) {
            SequentialBlock mlp = ToyBlocks.mlp(m, 4, 8, 2, DataType.FLOAT32);
            Lora.apply(mlp, LoraConfig.builder().setRank(2).optTargetModules("0").build());
            LoraReport second = Lora.apply(mlp, LoraConfig.builder().setRank(3).optDropout(0.1f)
                    .optTargetModules("2").build());
            assertEquals(List.of("2"), second.wrappedPaths());
            assertEquals(2 * 4 + 8 * 2 + 3 * 8 + 2 * 3, second.trainableParameters());
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(mlp).entrySet()) {
                assertEquals(e.getKey().contains(".lora_"), e.getValue().requiresGradient(), e.getKey());
            }
            assertEquals("LoraLinear(8 -> 2, r=3, alpha=8.0, dropout=0.1, base=Linear)",
                    BlockTrees.get(mlp, "2").toString());
        }
    }

    /**
     * The backward must not read memory the JVM may have freed: DJL's {@code mul(Number)} hands autograd a tensor over
     * a Java buffer that is collectable as soon as the forward returns. Garbage is collected and direct buffers are
     * churned between forward and backward; the gradients must still be the hand-computed ones.
     */
    @Test
    void gradientsSurviveAGarbageCollectionBetweenForwardAndBackward() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(7);
            SequentialBlock root = new SequentialBlock().add(ToyBlocks.linear(m, 8, 5, DataType.FLOAT32));
            Lora.apply(root, LoraConfig.builder().setRank(2).optAlpha(6).optTargetModules("0").build());
            randomizeB(root, m, 0.5f);
            LoraLinear lora = (LoraLinear) BlockTrees.get(root, "0");
            NDArray x = m.randomNormal(new Shape(3, 8));
            NDArray a = lora.loraA().getArray();
            try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                NDArray loss;
                try (NDManager step = m.newSubManager()) {
                    NDArray y = forward(root, step, x.duplicate(), true);
                    loss = y.sum();
                    loss.attach(m);
                }
                for (int i = 0; i < 10; i++) {
                    System.gc();
                    List<java.nio.ByteBuffer> junk = new java.util.ArrayList<>();
                    for (int j = 0; j < 2000; j++) {
                        junk.add(java.nio.ByteBuffer.allocateDirect(4).putFloat(0, 1e30f));
                    }
                    Thread.sleep(10);
                }
                gc.backward(loss);
            }
            // L = sum(y): dA = s (1 B)^T x
            NDArray dA = m.ones(new Shape(3, 5)).matMul(lora.loraB().getArray()).transpose().matMul(x).mul(3f);
            assertTrue(maxAbsDiff(dA, a.getGradient()) < 1e-4f, "dA " + maxAbsDiff(dA, a.getGradient()));
        }
    }

    /** A pass-through decorator, as FP16 wrappers are. */
    static final class Wrapper extends ai.djl.nn.AbstractBlock implements ai.djl.memopt.nn.BlockDecorator {
        private final Block inner;

        Wrapper(Block inner) {
            this.inner = addChildBlock("wrapped", inner);
        }

        @Override
        public Block delegate() {
            return inner;
        }

        @Override
        protected NDList forwardInternal(ParameterStore ps, NDList in, boolean training,
                ai.djl.util.PairList<String, Object> p) {
            return inner.forward(ps, in, training, p);
        }

        @Override
        public Shape[] getOutputShapes(Shape[] inputShapes) {
            return inner.getOutputShapes(inputShapes);
        }
    }

    @Test
    void aDecoratedProjectionGetsItsAdapterInsideTheDecorator() {
        // issue 14: decorators compose in any order; LoRA after a decorator goes inside it, as if applied first
        try (NDManager m = NDManager.newBaseManager()) {
            Linear linear = ToyBlocks.linear(m, 4, 3, DataType.FLOAT32);
            Wrapper wrapper = new Wrapper(linear);
            SequentialBlock root = new SequentialBlock().add(wrapper);
            Lora.apply(root, LoraConfig.builder().setRank(2).optTargetModules("0").build());
            assertSame(wrapper, BlockTrees.get(root, "0"), "the decorator stays outermost");
            LoraLinear adapter = assertInstanceOf(LoraLinear.class, wrapper.delegate());
            assertSame(linear, adapter.base());
            assertEquals(List.of("0"), List.copyOf(Lora.adapters(root).keySet()));
            assertEquals(List.of("0"), Lora.unload(root));
            assertSame(linear, wrapper.delegate(), "unloading puts the base back inside the decorator");
        }
    }
}
