package ai.djl.memopt;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingGradientCollector;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.lora.LoraLinear;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockSite;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.LayerOverride;
import ai.djl.memopt.quantize.PruningConfig;
import ai.djl.memopt.quantize.Pruner;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Activation;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Random;
import java.util.stream.Stream;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.MethodSource;

/**
 * Issue 14: every pair of decorators (checkpoint, mixed precision, quantize, prune, LoRA), applied in both orders to a
 * plain {@code SequentialBlock} MLP, a residual block and the tiny DeepSeek-V3 fixture, either builds the same model
 * (the same blocks at every path, the same trainable parameters and FP32 masters, the same outputs and gradients) or
 * refuses, naming the conflict. The reference for each order is the other order, run on an identical copy.
 */
class DecoratorOrderTest {

    private static final Path V3 = Path.of("src/test/resources/fixtures/tiny-deepseek-v3");
    private static final int WIDTH = 16;

    private static NDManager manager;

    @BeforeAll
    static void setUp() {
        manager = NDManager.newBaseManager();
    }

    @AfterAll
    static void tearDown() {
        manager.close();
    }

    enum Model { MLP, RESIDUAL, DEEPSEEK }

    enum Decorator { CHECKPOINT, MIXED_PRECISION, QUANTIZE, PRUNE, LORA }

    static Stream<Arguments> pairs() {
        List<Arguments> out = new ArrayList<>();
        for (Model model : Model.values()) {
            Decorator[] d = Decorator.values();
            for (int i = 0; i < d.length; i++) {
                for (int j = i + 1; j < d.length; j++) {
                    out.add(Arguments.of(model, d[i], d[j]));
                }
            }
        }
        return out.stream();
    }

    @ParameterizedTest(name = "{0}: {1} and {2}")
    @MethodSource("pairs")
    void eitherOrderGivesTheSameModelOrARefusal(Model model, Decorator a, Decorator b) throws IOException {
        try (NDManager m = manager.newSubManager()) {
            Block template = build(model, m);
            Outcome ab = run(model, template, m, a, b);
            Outcome ba = run(model, template, m, b, a);
            Optional<String> conflict = expectedConflict(a, b);
            if (conflict.isPresent()) {
                // exactly the conflicting order is refused, naming the conflict; the other one works
                Outcome refused = ab.refusal != null ? ab : ba;
                Outcome worked = ab.refusal != null ? ba : ab;
                assertTrue(refused.refusal != null, "one order must be refused: " + a + ", " + b);
                assertTrue(refused.refusal.getMessage().contains(conflict.get()), refused.refusal.getMessage());
                assertTrue(worked.refusal == null, () -> "the other order must work: " + worked.refusal);
                return;
            }
            assertTrue(ab.refusal == null, () -> a + " then " + b + " refused: " + ab.refusal);
            assertTrue(ba.refusal == null, () -> b + " then " + a + " refused: " + ba.refusal);
            assertEquals(ab.structure, ba.structure, "the blocks at every path");
            assertEquals(ab.masters, ba.masters, "the FP32 master weights kept");
            assertEquals(ab.gradients.keySet(), ba.gradients.keySet(), "the trainable parameters");
            boolean half = a == Decorator.MIXED_PRECISION || b == Decorator.MIXED_PRECISION;
            assertClose("output", ab.output, ba.output, half);
            for (String k : ab.gradients.keySet()) {
                assertClose("gradient of " + k, ab.gradients.get(k), ba.gradients.get(k), half);
            }
        }
    }

    /** The one refusal in the matrix: a quantized layer cannot be pruned. */
    private static Optional<String> expectedConflict(Decorator a, Decorator b) {
        boolean qp = (a == Decorator.QUANTIZE && b == Decorator.PRUNE)
                || (a == Decorator.PRUNE && b == Decorator.QUANTIZE);
        return qp ? Optional.of("already quantized") : Optional.empty();
    }

    @Test
    void checkpointingBeforeQuantizingStillQuantizesEveryLinear() {
        // the report of issue 14 ("0 -> 0 bytes over 0 layers" after Checkpointing.wrapChildren(mlp, sqrtN()))
        try (NDManager m = manager.newSubManager()) {
            SequentialBlock mlp = (SequentialBlock) build(Model.MLP, m);
            Checkpointing.wrapChildren(mlp, CheckpointPolicy.sqrtN());
            QuantizationReport report = Quantizer.quantize(mlp, Int8WeightOnlyConfig.builder().build());
            assertEquals(List.of("0", "2", "4", "6"), report.layers().stream().map(QuantizationReport.Layer::path)
                    .collect(java.util.stream.Collectors.toList()));
            assertTrue(report.toString().contains("4 layers"), report.toString());
        }
    }

    @Test
    void aFilterThatMatchesNothingSaysSoAndNamesTheLayerTypes() {
        try (NDManager m = manager.newSubManager()) {
            Block mlp = build(Model.MLP, m);
            IllegalArgumentException q = assertThrows(IllegalArgumentException.class, () -> Quantizer.quantize(mlp,
                    Int8WeightOnlyConfig.builder().optFilter((path, block) -> Optional.of("kept")).build()));
            assertTrue(q.getMessage().contains("4 Linear, 3 LambdaBlock"), q.getMessage());
            IllegalArgumentException p = assertThrows(IllegalArgumentException.class, () -> Pruner.prune(mlp,
                    PruningConfig.twoFour().withFilter((path, block) -> Optional.of("kept"))));
            assertTrue(p.getMessage().contains("4 Linear, 3 LambdaBlock"), p.getMessage());
            IllegalArgumentException l = assertThrows(IllegalArgumentException.class, () -> Lora.apply(mlp,
                    LoraConfig.builder().setRank(2).optTargetModules("q_proj").build()));
            assertTrue(l.getMessage().contains("4 Linear, 3 LambdaBlock"), l.getMessage());
            IllegalArgumentException c = assertThrows(IllegalArgumentException.class, () -> Checkpointing.wrapChildren(
                    mlp, CheckpointPolicy.matching((name, block) -> false)));
            assertTrue(c.getMessage().contains("4 Linear, 3 LambdaBlock"), c.getMessage());
            IllegalArgumentException o = assertThrows(IllegalArgumentException.class, () -> Quantizer.quantize(mlp,
                    Int8WeightOnlyConfig.builder().addOverride(LayerOverride.skip("model.layers.*")).build()));
            assertTrue(o.getMessage().contains("override 'model.layers.*' matches no Linear layer")
                    && o.getMessage().contains("4 Linear, 3 LambdaBlock"), o.getMessage());
            assertEquals(4, BlockTrees.parameters(mlp).size() / 2, "nothing quantized before the refusal");
            // and a fully quantized model is not quantized again in silence
            Quantizer.quantize(mlp, Int8WeightOnlyConfig.builder().build());
            IllegalArgumentException again = assertThrows(IllegalArgumentException.class,
                    () -> Quantizer.quantize(mlp, Int8WeightOnlyConfig.builder().build()));
            assertTrue(again.getMessage().contains("already quantized") && again.getMessage().contains(
                    "4 QuantizedLinear"), again.getMessage());
        }
    }

    // ------------------------------------------------------------------ one order

    /** What one order of two decorators gave. */
    private static final class Outcome {
        RuntimeException refusal;
        List<String> structure;
        List<String> masters = List.of();
        float[] output;
        Map<String, float[]> gradients;
    }

    private static Outcome run(Model model, Block template, NDManager m, Decorator first, Decorator second)
            throws IOException {
        Outcome o = new Outcome();
        Block root = build(model, m);
        copyValues(template, root);
        try {
            root = apply(first, model, root);
            root = apply(second, model, root);
        } catch (IllegalArgumentException | IllegalStateException e) {
            o.refusal = e;
            return o;
        }
        setAdapters(root);
        o.structure = structure(root);
        if (root instanceof MixedPrecisionBlock) {
            List<String> masters = new ArrayList<>();
            ((MixedPrecisionBlock) root).masterWeights().forEach(w -> masters.add(w.path()));
            o.masters = masters;
        }
        NDArray input = input(model, m);
        try (NDManager step = m.newSubManager()) {
            NDArray out = root.forward(new ParameterStore(step, false), new NDList(input), false).head();
            o.output = out.toType(DataType.FLOAT32, false).toFloatArray();
        }
        o.gradients = gradients(root, input, m);
        return o;
    }

    private static Block apply(Decorator d, Model model, Block root) {
        switch (d) {
            case CHECKPOINT:
                if (model == Model.MLP) {
                    Checkpointing.wrapChildren(root, CheckpointPolicy.sqrtN());
                } else if (model == Model.RESIDUAL) {
                    Checkpointing.wrapChildren(root, CheckpointPolicy.all());
                } else {
                    Checkpointing.wrapChildren(BlockTrees.get(root, "model.layers"), CheckpointPolicy.all());
                }
                return root;
            case MIXED_PRECISION:
                return MixedPrecisionBlock.wrap(root);
            case QUANTIZE:
                Quantizer.quantize(root, Int8WeightOnlyConfig.builder().build());
                return root;
            case PRUNE:
                Pruner.prune(root, PruningConfig.twoFour());
                return root;
            case LORA:
                LoraConfig.Builder lora = LoraConfig.builder().setRank(4).optAlpha(8);
                if (model == Model.MLP) {
                    lora.optTargetModules("0", "2", "4", "6");
                } else if (model == Model.RESIDUAL) {
                    lora.optTargetRegex("[0-9]+\\.[02]");
                } else {
                    // attention, the dense MLP, shared and routed experts (the gathered path stacks LoRA experts)
                    // (PEFT's rules: expert names in target_modules mean the routed experts; the dense MLP and the
                    // shared experts are reached through their weights)
                    lora.optTargetModules("q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                            .optTargetParameters("mlp.up_proj.weight", "shared_experts.up_proj.weight");
                }
                Lora.apply(root, lora.build());
                return root;
            default:
                throw new AssertionError(d);
        }
    }

    /**
     * Gives every adapter the same non-zero weights in both orders (a fresh lora_B is zero and would hide the
     * adapters from the outputs), through the site's value, i.e. into the FP32 master under mixed precision.
     */
    private static void setAdapters(Block root) {
        for (Map.Entry<String, LoraLinear> e : Lora.adapters(root).entrySet()) {
            BlockSite site = BlockTrees.site(root, e.getKey());
            Random random = new Random(e.getKey().hashCode());
            for (Parameter p : List.of(e.getValue().loraA(), e.getValue().loraB())) {
                NDArray value = site.value(p);
                float[] v = new float[(int) value.size()];
                for (int i = 0; i < v.length; i++) {
                    v[i] = (float) (0.1 * random.nextGaussian());
                }
                try (NDArray src = value.getManager().create(v, value.getShape())) {
                    value.set(new ai.djl.ndarray.index.NDIndex("..."), src.toType(value.getDataType(), false));
                }
                site.valueChanged(p);
            }
        }
    }

    /** Every path with the wrappers and the class of the block that computes there. */
    private static List<String> structure(Block root) {
        List<String> out = new ArrayList<>();
        for (BlockSite s : BlockTrees.sites(root).values()) {
            StringBuilder line = new StringBuilder(s.path()).append(':');
            s.wrappers().forEach(w -> line.append(w.getClass().getSimpleName()).append('/'));
            out.add(line.append(s.core().getClass().getSimpleName()).toString());
        }
        return out;
    }

    /** Gradients of a fixed linear loss for every trainable parameter (and the input, for float inputs). */
    private static Map<String, float[]> gradients(Block root, NDArray input, NDManager m) {
        Map<String, Parameter> trainable = new LinkedHashMap<>();
        BlockTrees.parameters(root).forEach((k, p) -> {
            if (p.requiresGradient()) {
                trainable.put(k, p);
            }
        });
        trainable.values().forEach(p -> JniUtils.zeroGrad((PtNDArray) p.getArray()));
        Map<String, float[]> grads = new LinkedHashMap<>();
        try (NDManager step = m.newSubManager()) {
            NDArray x = input.duplicate();
            x.attach(step);
            boolean floatInput = x.getDataType().isFloating();
            if (floatInput) {
                x.setRequiresGradient(true);
            }
            try (GradientCollector gc = CheckpointingGradientCollector.open(step)) {
                NDArray out = root.forward(new ParameterStore(step, false), new NDList(x), true).head();
                assertEquals(DataType.FLOAT32, out.getDataType(), "outputs are FP32, also under mixed precision");
                NDArray weights = pseudoRandom(step, out.getShape(), 11);
                gc.backward(out.mul(weights).sum());
            }
            for (Map.Entry<String, Parameter> e : trainable.entrySet()) {
                try (NDArray g = e.getValue().getArray().getGradient()) {
                    grads.put(e.getKey(), g.toType(DataType.FLOAT32, false).toFloatArray());
                }
            }
            if (floatInput) {
                grads.put("(input)", x.getGradient().toFloatArray());
            }
        }
        assertFalse(grads.isEmpty(), "something to differentiate");
        return grads;
    }

    private static void assertClose(String what, float[] a, float[] b, boolean half) {
        assertEquals(a.length, b.length, what + ": sizes");
        double max = 0;
        double diff = 0;
        for (int i = 0; i < a.length; i++) {
            max = Math.max(max, Math.abs(a[i]));
            diff = Math.max(diff, Math.abs(a[i] - b[i]));
            assertTrue(Float.isFinite(a[i]) && Float.isFinite(b[i]), what + ": not finite at " + i);
        }
        double tolerance = (half ? 2e-3 : 1e-5) * (1 + max);
        assertTrue(diff <= tolerance, what + ": orders differ by " + diff + " (largest value " + max + ")");
    }

    // ------------------------------------------------------------------ models

    private static Block build(Model model, NDManager m) {
        switch (model) {
            case MLP:
                SequentialBlock mlp = new SequentialBlock();
                for (int i = 0; i < 3; i++) {
                    mlp.add(Linear.builder().setUnits(WIDTH).build()).add(Activation::tanh);
                }
                mlp.add(Linear.builder().setUnits(8).build());
                mlp.initialize(m, DataType.FLOAT32, new Shape(2, WIDTH));
                return mlp;
            case RESIDUAL:
                Residual residual = new Residual(3);
                residual.initialize(m, DataType.FLOAT32, new Shape(2, WIDTH));
                return residual;
            case DEEPSEEK:
                try {
                    return DeepSeekLoader.load(V3, m, DataType.FLOAT32);
                } catch (IOException e) {
                    throw new IllegalStateException(e);
                }
            default:
                throw new AssertionError(model);
        }
    }

    private static NDArray input(Model model, NDManager m) {
        if (model == Model.DEEPSEEK) {
            return m.create(new long[] {5, 17, 42, 99, 3, 250, 7, 64}).reshape(1, 8);
        }
        return pseudoRandom(m, new Shape(2, WIDTH), 3);
    }

    private static NDArray pseudoRandom(NDManager m, Shape shape, long seed) {
        Random random = new Random(seed);
        float[] v = new float[(int) shape.size()];
        for (int i = 0; i < v.length; i++) {
            v[i] = (float) random.nextGaussian();
        }
        return m.create(v, shape);
    }

    /** The template's parameter values, by path, into an identically built copy. */
    private static void copyValues(Block from, Block to) {
        Map<String, Parameter> source = BlockTrees.parameters(from);
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(to).entrySet()) {
            e.getValue().getArray().set(source.get(e.getKey()).getArray().toByteBuffer());
        }
    }

    /** x -> x + layer_i(x) with layer_i = Linear, tanh, Linear; the additions are outside the children. */
    static final class Residual extends AbstractBlock {
        Residual(int depth) {
            super((byte) 1);
            for (int i = 0; i < depth; i++) {
                addChildBlock(Integer.toString(i), new SequentialBlock()
                        .add(Linear.builder().setUnits(WIDTH).build())
                        .add(Activation::tanh)
                        .add(Linear.builder().setUnits(WIDTH).build()));
            }
        }

        @Override
        protected NDList forwardInternal(ParameterStore ps, NDList inputs, boolean training,
                PairList<String, Object> params) {
            NDArray x = inputs.head(); // (B, W)
            for (Block layer : getChildren().values()) {
                x = x.add(layer.forward(ps, new NDList(x), training).head());
            }
            return new NDList(x);
        }

        @Override
        public Shape[] getOutputShapes(Shape[] inputShapes) {
            return inputShapes;
        }

        @Override
        protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
            for (Block b : getChildren().values()) {
                b.initialize(manager, dataType, inputShapes);
            }
        }
    }
}
