package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.engine.Engine;
import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingGradientCollector;
import ai.djl.memopt.checkpoint.DeepSeekCheckpointTestAccess;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.FusedAttention;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.testing.SystemProperties;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/**
 * The scripted decoder layer ({@link ScriptedLayer}, one TorchScript call per layer forward) against the Java path of
 * the same model: logits, loss and every parameter gradient, in FP32 (V3 and V2 fixtures, both attention kernels, both
 * graph-executor settings), in mixed precision (FP16 with FP32 islands), under layer-level checkpointing; and the
 * fallbacks (decorated layers, the switch).
 */
class ScriptedLayerTest {

    private static final DeepSeekConfig TINY = DeepSeekCheckpointTestAccess.tiny(DeepSeekConfig.DEEPSEEK_V3);

    private static DeepSeekForCausalLM tiny(NDManager m, long seed) {
        return DeepSeekForCausalLM.random(TINY, seed, m, DataType.FLOAT32);
    }

    /** One training step's results. */
    record Step(float[] logits, float loss, Map<String, float[]> grads, long scriptedCalls) {}

    private static Step step(Block model, NDManager manager, NDArray ids, String script, boolean checkpointing)
            throws Exception {
        return step(model, manager, new NDList(ids), script, checkpointing);
    }

    private static Step step(Block model, NDManager manager, NDList inputs, String script, boolean checkpointing)
            throws Exception {
        NDArray ids = inputs.head();
        return SystemProperties.with(ScriptedLayer.PROPERTY, script, () -> {
            Map<String, Parameter> params = BlockTrees.parameters(model);
            for (Parameter p : params.values()) {
                if (p.requiresGradient()) {
                    p.getArray().setRequiresGradient(true);
                    p.getArray().getGradient().muli(0);
                }
            }
            long calls = ScriptedLayer.calls();
            float[] logits;
            float loss;
            try (NDManager m = manager.newSubManager();
                    GradientCollector gc = checkpointing ? CheckpointingGradientCollector.open(m)
                            : Engine.getInstance().newGradientCollector()) {
                NDArray out = model.forward(new ParameterStore(m, false), inputs, true).head();
                NDArray l = CausalLmLoss.mean(out, ids);
                logits = out.toType(DataType.FLOAT32, false).toFloatArray();
                loss = l.toType(DataType.FLOAT32, false).getFloat();
                // a collection between forward and backward would expose any Java buffer autograd still reads
                System.gc();
                gc.backward(l);
            }
            Map<String, float[]> grads = new LinkedHashMap<>();
            for (Map.Entry<String, Parameter> e : params.entrySet()) {
                if (e.getValue().requiresGradient()) {
                    grads.put(e.getKey(), e.getValue().getArray().getGradient().toType(DataType.FLOAT32, false)
                            .toFloatArray());
                }
            }
            return new Step(logits, loss, grads, ScriptedLayer.calls() - calls);
        });
    }

    /** Largest {@code |a - b| / max(|b|_max, tiny)} over the arrays: relative to the largest reference value. */
    private static double relative(float[] a, float[] b) {
        assertEquals(b.length, a.length);
        double scale = 1e-12;
        double worst = 0;
        for (float v : b) {
            scale = Math.max(scale, Math.abs(v));
        }
        for (int i = 0; i < a.length; i++) {
            worst = Math.max(worst, Math.abs(a[i] - b[i]));
        }
        return worst / scale;
    }

    /** Asserts that {@code scripted} equals {@code java} within {@code tolerance} (relative) everywhere. */
    private static void assertSame(Step scripted, Step java, double tolerance, String what) {
        assertTrue(scripted.scriptedCalls() > 0, what + ": the scripted layer never ran");
        assertEquals(0, java.scriptedCalls(), what + ": the Java path ran a script");
        double logits = relative(scripted.logits(), java.logits());
        assertTrue(logits <= tolerance, what + ": logits differ by " + logits);
        assertEquals(java.loss(), scripted.loss(), tolerance * Math.abs(java.loss()), what + ": loss");
        double worst = 0;
        int nonZero = 0;
        for (Map.Entry<String, float[]> e : java.grads().entrySet()) {
            float[] s = scripted.grads().get(e.getKey());
            double d = relative(s, e.getValue());
            assertTrue(d <= tolerance, what + ": gradient of " + e.getKey() + " differs by " + d);
            worst = Math.max(worst, d);
            for (float v : e.getValue()) {
                if (v != 0) {
                    nonZero++;
                    break;
                }
            }
        }
        assertTrue(nonZero > 20, what + ": only " + nonZero + " parameters got a gradient");
        System.out.printf("%s: %d calls, logits %.3g, %d gradients, worst %.3g (relative)%n", what,
                scripted.scriptedCalls(), logits, java.grads().size(), worst);
    }

    @ParameterizedTest
    @ValueSource(strings = {"eager", "fused"})
    void v3FixtureMatchesTheJavaPathAndTransformers(String kernel) throws Exception {
        SystemProperties.with(FusedAttention.KERNEL_PROPERTY, kernel,
                () -> v3MatchesTheJavaPathAndTransformers(kernel));
    }

    private static Void v3MatchesTheJavaPathAndTransformers(String kernel) throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile reference = SafetensorsFile.open(Fixtures.V3.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(Fixtures.V3, m, DataType.FLOAT32);
            NDArray ids = reference.load(m, "input_ids");
            Step java = step(lm, m, ids, "off", false);
            Step scripted = step(lm, m, ids, "on", false);
            assertEquals(lm.config().numHiddenLayers(), scripted.scriptedCalls());
            assertSame(scripted, java, 1e-5, "V3 " + kernel);
            float[] expected = reference.load(m, "logits").toFloatArray();
            assertTrue(relative(scripted.logits(), expected) < 1e-4, "logits against transformers");
            int checked = 0;
            for (String name : reference.names()) {
                if (name.startsWith("grad.")) {
                    float[] e = reference.readFloats(name);
                    float[] a = scripted.grads().get(name.substring("grad.".length()));
                    for (int i = 0; i < e.length; i++) {
                        float diff = Math.abs(e[i] - a[i]);
                        assertTrue(diff <= 1e-4 || diff <= 1e-3 * Math.abs(e[i]), name + "[" + i + "] = " + a[i]
                                + ", transformers " + e[i]);
                    }
                    checked++;
                }
            }
            assertTrue(checked >= 30, "expected the fixture's gradients, found " + checked);
        }
        return null;
    }

    @Test
    void v2FixtureMatchesTheJavaPathAndTransformers() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile reference = SafetensorsFile.open(Fixtures.V2.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(Fixtures.V2, m, DataType.FLOAT32);
            NDArray ids = reference.load(m, "input_ids");
            Step java = step(lm, m, ids, "off", false);
            Step scripted = step(lm, m, ids, "on", false);
            assertSame(scripted, java, 1e-5, "V2");
            float[] expected = reference.load(m, "logits").toFloatArray();
            assertTrue(relative(scripted.logits(), expected) < 1e-4, "logits against transformers");
            assertEquals(reference.load(m, "loss").getFloat(), scripted.loss(), 1e-5 * Math.abs(scripted.loss()));
        }
    }

    /**
     * With the profiling graph executor on (DJL's {@code ai.djl.pytorch.graph_optimizer}), libtorch may build
     * differentiable graphs once it has seen a few calls: the gradients stay those of the Java path, call after call.
     */
    @Test
    void gradientsHoldWithTheGraphOptimizerOn() throws Exception {
        AtomicReference<Throwable> failure = new AtomicReference<>();
        // a fresh thread: the optimizer setting is thread-local and taken at a thread's first scripted call
        Thread t = new Thread(() -> {
            try (NDManager m = NDManager.newBaseManager();
                    SafetensorsFile reference = SafetensorsFile.open(Fixtures.V3.resolve("reference.safetensors"))) {
                DeepSeekForCausalLM lm = DeepSeekLoader.load(Fixtures.V3, m, DataType.FLOAT32);
                NDArray ids = reference.load(m, "input_ids");
                Step java = step(lm, m, ids, "off", false);
                for (int i = 0; i < 4; i++) {
                    assertSame(step(lm, m, ids, "on", false), java, 1e-5, "V3 graph optimizer on, call " + i);
                }
            } catch (Throwable e) {
                failure.set(e);
            }
        });
        SystemProperties.with("ai.djl.pytorch.graph_optimizer", "true", () -> {
            t.start();
            t.join();
            return null;
        });
        if (failure.get() != null) {
            throw new AssertionError(failure.get());
        }
    }

    /** FP16 training as MixedPrecisionBlock runs it: FP16 working copies, norms and routers in FP32 islands. */
    @Test
    void mixedPrecisionStepMatchesTheJavaPath() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekConfig c = TINY;
            MixedPrecisionBlock mp = MixedPrecisionBlock.wrap(tiny(m, 7));
            DeepSeekDecoderLayer layer = (DeepSeekDecoderLayer) ((DeepSeekForCausalLM) mp.delegate()).model()
                    .layers().get(c.numHiddenLayers() - 1);
            assertNull(ScriptedLayer.unsupportedReason(layer), "a mixed-precision layer qualifies");
            assertEquals(DataType.FLOAT16,
                    BlockTrees.parameters(mp).get("model.layers.0.self_attn.o_proj.weight").getArray().getDataType());
            NDArray ids = tokens(m, 2, 10, c.vocabSize());
            Step java = step(mp, m, ids, "off", false);
            Step scripted = step(mp, m, ids, "on", false);
            // the same FP16 operators in the same order: equal up to a rounding of FP16 in a reduction order
            assertSame(scripted, java, 2e-3, "FP16 mixed precision");
        }
    }

    /** A padding mask: the eager attention with the additive mask, in the script as in Java. */
    @Test
    void paddingMaskMatchesTheJavaPath() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = tiny(m, 13);
            NDArray ids = tokens(m, 2, 9, TINY.vocabSize());
            long[] keep = new long[18];
            java.util.Arrays.fill(keep, 1);
            keep[0] = 0; // left padding of the first row
            keep[1] = 0;
            NDList inputs = new NDList(ids, m.create(keep, new Shape(2, 9)));
            assertSame(step(lm, m, inputs, "on", false), step(lm, m, inputs, "off", false), 1e-5, "padding mask");
        }
    }

    /** A sequence long enough that the CPU's eager attention runs its heads one group at a time (here one head). */
    @Test
    void headGroupsMatchTheJavaPath() throws Exception {
        DeepSeekConfig c = DeepSeekConfig.builder(DeepSeekConfig.DEEPSEEK_V3).vocabSize(64).hiddenSize(16)
                .intermediateSize(32).moeIntermediateSize(8).numHiddenLayers(2).numAttentionHeads(2).qLoraRank(8)
                .kvLoraRank(8).qkNopeHeadDim(4).qkRopeHeadDim(4).vHeadDim(4).nRoutedExperts(4).nSharedExperts(1)
                .numExpertsPerTok(2).nGroup(2).topkGroup(1).firstKDenseReplace(1).maxPositionEmbeddings(1024).build();
        int t = 740; // B * T * T > 2^19: one head per group
        assertEquals(1, MultiHeadLatentAttention.headGroup(2, 1, t, t, Device.cpu()));
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(c, 17, m, DataType.FLOAT32);
            NDArray ids = tokens(m, 1, t, c.vocabSize());
            assertSame(step(lm, m, ids, "on", false), step(lm, m, ids, "off", false), 1e-5, "head groups");
        }
    }

    /** {@code --checkpoint all}: a CheckpointBlock around each layer calls its forward again when recomputing. */
    @Test
    void layerLevelCheckpointingGivesTheSameGradients() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekConfig c = TINY;
            DeepSeekForCausalLM plain = tiny(m, 11);
            DeepSeekForCausalLM checkpointed = tiny(m, 11);
            List<String> wrapped = Checkpointing.wrapChildren(checkpointed, "model.layers", CheckpointPolicy.all());
            assertEquals(c.numHiddenLayers(), wrapped.size());
            NDArray ids = tokens(m, 2, 12, c.vocabSize());
            Step java = step(plain, m, ids, "off", false);
            Step scripted = step(checkpointed, m, ids, "on", true);
            assertTrue(scripted.scriptedCalls() >= 2L * c.numHiddenLayers(), "forward and recomputation scripted: "
                    + scripted.scriptedCalls());
            assertSame(scripted, java, 1e-5, "checkpoint all");
        }
    }

    /** Checkpointing inside the layer, or LoRA on a projection: the Java path, with the reason. */
    @Test
    void decoratedLayersFallBackToTheJavaPathWithAReason() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekConfig c = TINY;
            DeepSeekForCausalLM nested = tiny(m, 5);
            Checkpointing.wrapChildren(nested, "model.layers.0", CheckpointPolicy.all());
            String why = ScriptedLayer.unsupportedReason((DeepSeekDecoderLayer) nested.model().layers().get(0));
            assertNotNull(why);
            assertTrue(why.startsWith("model.layers.0."), why);
            assertTrue(why.contains("CheckpointBlock"), why);

            DeepSeekForCausalLM adapted = tiny(m, 5);
            Lora.apply(adapted, LoraConfig.builder().setRank(2).optTargetModules("q_a_proj").build());
            why = ScriptedLayer.unsupportedReason((DeepSeekDecoderLayer) adapted.model().layers().get(1));
            assertNotNull(why);
            assertTrue(why.contains("model.layers.1.self_attn.q_a_proj") && why.contains("Lora"), why);

            NDArray ids = tokens(m, 1, 8, c.vocabSize());
            Step fallback = step(adapted, m, ids, "on", false);
            assertEquals(0, fallback.scriptedCalls(), "no adapted layer may run the script");
        }
    }

    /**
     * On a GPU (skipped without one): the default there, with the fused attention kernel; FP32 and FP16 mixed precision
     * against the Java path on the same device. GPU index backward accumulates with atomics, so not bit-equal.
     */
    @Test
    @Tag("gpu")
    void gpuStepsMatchTheJavaPath() throws Exception {
        Assumptions.assumeTrue(Engine.getInstance().getGpuCount() > 0, "no GPU visible");
        try (NDManager m = NDManager.newBaseManager(Device.gpu())) {
            NDArray ids = tokens(m, 2, 64, TINY.vocabSize());
            DeepSeekForCausalLM lm = tiny(m, 19);
            assertSame(step(lm, m, ids, "on", false), step(lm, m, ids, "off", false), 1e-4, "GPU FP32");
            MixedPrecisionBlock mp = MixedPrecisionBlock.wrap(tiny(m, 19));
            assertSame(step(mp, m, ids, "on", false), step(mp, m, ids, "off", false), 1e-2, "GPU FP16");
        }
    }

    @Test
    void badPropertyValueIsRefused() throws Exception {
        SystemProperties.with(ScriptedLayer.PROPERTY, "sometimes", () -> {
            IllegalArgumentException e =
                    assertThrows(IllegalArgumentException.class, () -> ScriptedLayer.enabled(Device.cpu()));
            assertTrue(e.getMessage().contains(ScriptedLayer.PROPERTY) && e.getMessage().contains("sometimes"),
                    e.getMessage());
            return null;
        });
        SystemProperties.without(ScriptedLayer.PROPERTY, () -> {
            assertTrue(!ScriptedLayer.enabled(Device.cpu()), "unset: the Java path on the CPU");
            assertTrue(ScriptedLayer.enabled(Device.gpu()), "unset: the script on a GPU");
            return null;
        });
    }

    private static NDArray tokens(NDManager m, int b, int t, int vocab) {
        long[] ids = new long[b * t];
        for (int i = 0; i < ids.length; i++) {
            ids[i] = (i * 37L + 11) % vocab;
        }
        return m.create(ids, new Shape(b, t));
    }
}
