package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * The update fused into the backward ({@link FusedUpdate}) against the unfused update, the FP16 overflow found in the
 * middle of the backward, the refusal of gradient accumulation, resuming, and the optimizer offloaded to the host
 * against the on-device update.
 */
class FusedUpdateTest {

    @TempDir Path tmp;

    private static FineTuner.Builder builder(DeepSeekForCausalLM lm, FineTuner.Precision p) {
        return builder(lm, p, "all");
    }

    private static FineTuner.Builder builder(DeepSeekForCausalLM lm, FineTuner.Precision p, String checkpointing) {
        return FineTuner.builder().setModel(lm).optCheckpointing(checkpointing).optPrecision(p)
                .optSchedule(LearningRateSchedule.of(3e-3f, 2, 8, 0.1f)).optWeightDecay(0.01f).optSeed(5)
                .optLossChunkTokens(12);
    }

    private static DeepSeekForCausalLM model() {
        return DeepSeekForCausalLM.random(FineTunerTest.tiny(), 8, Device.cpu(), DataType.FLOAT32);
    }

    /** Weights (FP32 values) and optimizer moments after {@code steps} steps, fused or not. */
    private static Map<String, float[]> train(FineTuner.Precision p, boolean fused, boolean offload, int steps)
            throws Exception {
        return train(p, "all", fused, offload, steps);
    }

    private static Map<String, float[]> train(FineTuner.Precision p, String checkpointing, boolean fused,
            boolean offload, int steps) throws Exception {
        TokenDataset data = FineTunerTest.data(4);
        try (DeepSeekForCausalLM lm = model();
                FineTuner tuner = builder(lm, p, checkpointing).optFusedUpdate(fused).optOffloadOptimizer(offload)
                        .build()) {
            tuner.rowwiseGradients = false; // the same (autograd) embedding and head paths in both: see docs
            for (int i = 0; i < steps; i++) {
                StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                assertTrue(Double.isFinite(r.loss()), r.toString());
                if (fused) {
                    assertTrue(tuner.fused().fusedGroups >= 3, "layers and head updated during the backward: "
                            + tuner.fused().fusedGroups);
                    assertEquals(0, tuner.stateBytes().gradients(), "every gradient released after the step");
                    // the halves and the 4 experts of the 2 MoE layers, the halves of the dense one (fewer experts
                    // when some got no token)
                    assertTrue(checkpointing.equals("all") ? tuner.fused().nestedGroups == 0
                            : tuner.fused().nestedGroups >= 6, checkpointing + ": nested groups updated inside the"
                            + " layers' backward: " + tuner.fused().nestedGroups);
                }
            }
            StateBytes b = tuner.stateBytes();
            assertEquals(b.total(), b.deviceBytes() + b.hostBytes());
            if (offload) {
                assertEquals(b.masters() + b.optimizer(), b.hostBytes(), b.toString());
                assertTrue(b.optimizer() > 0);
            } else {
                assertEquals(0, b.hostBytes());
            }
            return snapshot(tuner);
        }
    }

    /** FP32 weights and every optimizer state array, by name. */
    static Map<String, float[]> snapshot(FineTuner tuner) throws Exception {
        Map<String, float[]> out = new LinkedHashMap<>(FineTunerTest.weights(tuner));
        for (Map.Entry<String, Parameter> e : tuner.parameters().entrySet()) {
            for (Map.Entry<String, NDArray> s : tuner.optimizer().stateArrays(e.getValue().getId()).entrySet()) {
                out.put(e.getKey() + "." + s.getKey(), s.getValue().toType(DataType.FLOAT32, true).toFloatArray());
            }
        }
        return out;
    }

    /** Every layer checkpointed, and nested (halves and experts updated inside the layer's backward). */
    @org.junit.jupiter.params.ParameterizedTest
    @org.junit.jupiter.params.provider.ValueSource(strings = {"all", "nested+experts"})
    void fusedEqualsUnfusedExactlyInFp32(String checkpointing) throws Exception {
        Map<String, float[]> plain = train(FineTuner.Precision.FP32, checkpointing, false, false, 3);
        Map<String, float[]> fused = train(FineTuner.Precision.FP32, checkpointing, true, false, 3);
        assertEquals(plain.keySet(), fused.keySet());
        for (String k : plain.keySet()) {
            assertArrayEquals(plain.get(k), fused.get(k), checkpointing + " " + k);
        }
    }

    @org.junit.jupiter.params.ParameterizedTest
    @org.junit.jupiter.params.provider.ValueSource(strings = {"all", "nested+experts"})
    void fusedMatchesUnfusedInFp16(String checkpointing) throws Exception {
        Map<String, float[]> plain = train(FineTuner.Precision.FP16, checkpointing, false, false, 3);
        Map<String, float[]> fused = train(FineTuner.Precision.FP16, checkpointing, true, false, 3);
        double d = FineTunerTest.maxDiff(plain, fused);
        System.out.printf("FP16 fused vs unfused (%s): max difference of weights and moments %.3g%n", checkpointing,
                d);
        assertTrue(d < 1e-3, "FP16 fused vs unfused " + d); // the suite's FP16 tolerance (FineTunerTest)
    }

    @Test
    void offloadedEqualsOnDevice() throws Exception {
        for (FineTuner.Precision p : FineTuner.Precision.values()) {
            for (boolean fused : new boolean[] {false, true}) {
                Map<String, float[]> device = train(p, fused, false, 3);
                Map<String, float[]> host = train(p, fused, true, 3);
                for (String k : device.keySet()) {
                    assertArrayEquals(device.get(k), host.get(k), p + " fused=" + fused + " " + k);
                }
            }
        }
    }

    /**
     * With the row-wise embedding gradient, the fused step makes the table's gradient buffer only after the backward:
     * no buffer exists while the layers are back-propagated, and the weights and moments are those of the step that
     * makes the buffer at its start, bit for bit, in FP32 and FP16.
     */
    @Test
    void theEmbeddingBufferIsMadeAfterTheLayersBackward() throws Exception {
        for (FineTuner.Precision p : FineTuner.Precision.values()) {
            Map<String, float[]> atStart = null;
            for (boolean onDemand : new boolean[] {false, true}) {
                TokenDataset data = FineTunerTest.data(4);
                try (DeepSeekForCausalLM lm = model();
                        FineTuner tuner = builder(lm, p).optFusedUpdate(true).build()) {
                    Parameter table = lm.model().tokenEmbedding().weight();
                    tuner.fused().embeddingOnDemand = onDemand;
                    List<Boolean> bufferDuringLayers = new ArrayList<>();
                    tuner.fused().beforeGroup = blocks -> {
                        if (!blocks.isEmpty()) {
                            bufferDuringLayers.add(GradientBuffers.exists(table));
                        }
                    };
                    for (int i = 0; i < 3; i++) {
                        assertTrue(!tuner.step(data.trainBatch(tuner.dataPosition(), 2)).skipped());
                    }
                    assertEquals(3, tuner.rowwiseEmbeddings, p + ": the row-wise embedding gradient every step");
                    assertEquals(9, bufferDuringLayers.size(), bufferDuringLayers.toString());
                    assertEquals(List.of(!onDemand), bufferDuringLayers.stream().distinct().toList(),
                            p + " on demand " + onDemand + ": a buffer during the layers' backward");
                    Map<String, float[]> now = snapshot(tuner);
                    if (atStart == null) {
                        atStart = now;
                    } else {
                        for (String k : atStart.keySet()) {
                            assertArrayEquals(atStart.get(k), now.get(k), p + " " + k);
                        }
                    }
                }
            }
        }
    }

    @Test
    void gradientAccumulationIsRefused() {
        try (DeepSeekForCausalLM lm = model()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> builder(lm, FineTuner.Precision.FP16).optFusedUpdate(true).optGradientAccumulation(2)
                            .build());
            assertTrue(e.getMessage().contains("--fused-update") && e.getMessage().contains("--grad-accum 2"),
                    e.getMessage());
        }
    }

    /** Whether {@code blocks} (a listener call's) are decoder layer {@code layer}'s. */
    private static boolean isLayer(DeepSeekForCausalLM lm, List<Block> blocks, int layer) {
        Map<String, Parameter> mine = BlockTrees.parameters(BlockTrees.get(lm, "model.layers." + layer));
        return !blocks.isEmpty() && mine.values().stream()
                .anyMatch(p -> BlockTrees.parameters(blocks.get(0)).containsValue(p));
    }

    /** "head" or "layer N" for a listener call, for the order of the calls. */
    private static String label(DeepSeekForCausalLM lm, List<Block> blocks) {
        for (int i = 0; i < FineTunerTest.tiny().numHiddenLayers(); i++) {
            if (isLayer(lm, blocks, i)) {
                return "layer " + i;
            }
        }
        return blocks.isEmpty() ? "head" : "other";
    }

    /**
     * An FP16 overflow forced into the head's gradients, found before anything is updated: the step is skipped, the
     * scale halved, and every weight, master, moment and step count is as before the step.
     */
    @Test
    void overflowInTheHeadSkipsTheStepLeavingEverythingUntouched() throws Exception {
        TokenDataset data = FineTunerTest.data(4);
        try (DeepSeekForCausalLM lm = model();
                FineTuner tuner = builder(lm, FineTuner.Precision.FP16).optFusedUpdate(true).build()) {
            for (int i = 0; i < 2; i++) { // moments and step counts to keep
                assertTrue(!tuner.step(data.trainBatch(tuner.dataPosition(), 2)).skipped());
            }
            Map<String, float[]> before = snapshot(tuner);
            Map<String, float[]> workingBefore = working(tuner);
            Map<String, Long> stepsBefore = stepCounts(tuner);
            float scale = tuner.lossScale();
            List<String> order = new ArrayList<>();
            tuner.fused().beforeGroup = blocks -> {
                order.add(label(lm, blocks));
                if (blocks.isEmpty()) {
                    poison(List.of(tuner.parameters().get("lm_head.weight")));
                }
            };
            StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 2));
            tuner.fused().beforeGroup = null;
            assertTrue(r.skipped(), r.toString());
            assertEquals(scale / 2, tuner.lossScale(), "scale halved");
            assertEquals(List.of("head", "layer 2", "layer 1", "layer 0"), order, "one pass, no retry");
            assertEquals(0, tuner.stateBytes().gradients(), "every gradient released");
            Map<String, float[]> after = snapshot(tuner);
            assertEquals(before.keySet(), after.keySet());
            for (String k : before.keySet()) {
                assertArrayEquals(before.get(k), after.get(k), k + " untouched");
            }
            Map<String, float[]> workingAfter = working(tuner);
            for (String k : workingBefore.keySet()) {
                assertArrayEquals(workingBefore.get(k), workingAfter.get(k), k + " (FP16 working copy) untouched");
            }
            assertEquals(stepsBefore, stepCounts(tuner), "step counts untouched");
            StepResult next = tuner.step(data.trainBatch(tuner.dataPosition(), 2)); // and training goes on
            assertTrue(!next.skipped() && Double.isFinite(next.loss()), next.toString());
        }
    }

    /**
     * An FP16 overflow forced once into a layer's gradients after the head and the later layers were updated (layer 1,
     * and layer 0, whose input is the gathered embedding; with {@code every:2}, layer 2, whose backward also reaches
     * the plain layer 1 and layer 0's output, and layer 0): that layer is back-propagated again at half the scale and
     * the step goes on. Not skipped; every parameter is updated once, with the gradient the unfused step uses (read
     * back from the first moment: {@code g = (m3 - beta1 m2) / (1 - beta1)}, so a gradient counted one and a half
     * times or divided by the wrong scale fails); no gradient buffer is left; the next step starts at half the scale.
     */
    @Test
    void overflowInAMiddleLayerIsRetriedAtHalfTheScale() throws Exception {
        for (String[] c : new String[][] {{"all", "1"}, {"all", "0"}, {"every:2", "2"}, {"every:2", "0"},
                {"nested+experts", "1"}, {"nested+experts", "1", "expert"}}) {
            String spec = c[0];
            int layer = Integer.parseInt(c[1]);
            boolean inExpert = c.length > 2; // the overflow in an expert's gradients, seen at its nested call
            List<String> visits = spec.startsWith("every") ? List.of("head", "layer 2", "layer 0")
                    : List.of("head", "layer 2", "layer 1", "layer 0");
            TokenDataset data = FineTunerTest.data(4);
            Map<String, float[]> plainBefore;
            Map<String, float[]> plainAfter;
            Map<String, Long> plainSteps;
            try (DeepSeekForCausalLM lm = model();
                    FineTuner tuner = builder(lm, FineTuner.Precision.FP16, spec).build()) {
                for (int i = 0; i < 2; i++) {
                    tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                }
                plainBefore = snapshot(tuner);
                assertTrue(!tuner.step(data.trainBatch(tuner.dataPosition(), 2)).skipped());
                plainAfter = snapshot(tuner);
                plainSteps = stepCounts(tuner);
            }
            try (DeepSeekForCausalLM lm = model();
                    FineTuner tuner = builder(lm, FineTuner.Precision.FP16, spec).optFusedUpdate(true).build()) {
                for (int i = 0; i < 2; i++) {
                    assertTrue(!tuner.step(data.trainBatch(tuner.dataPosition(), 2)).skipped());
                }
                Map<String, float[]> before = snapshot(tuner);
                assertTrue(FineTunerTest.maxDiff(plainBefore, before) < 1e-3, "the runs agree before the overflow");
                float scale = tuner.lossScale();
                List<String> order = new ArrayList<>();
                int[] poisoned = {0};
                tuner.fused().beforeGroup = blocks -> {
                    order.add(label(lm, blocks));
                    if (!inExpert && isLayer(lm, blocks, layer) && poisoned[0]++ == 0) {
                        // with nested segments only the layer's norms still hold gradients here
                        poison(BlockTrees.parameters(BlockTrees.get(lm, "model.layers." + layer)).values());
                    }
                };
                List<Integer> expertAttempts = new ArrayList<>();
                Block expert = inExpert ? BlockTrees.get(lm, "model.layers." + layer + ".mlp.experts.0") : null;
                // the retry recomputes the layer with the FP16 weights of its forward, also those of the nested
                // groups updated in the first attempt
                Map<String, float[]> workingBefore = working(tuner);
                String prefix = "model.layers." + layer + ".";
                List<String> changedAtRetry = new ArrayList<>();
                int[] comparedAtRetry = {0};
                tuner.fused().beforeNested = (blocks, attempt) -> {
                    if (attempt > 0 && comparedAtRetry[0]++ == 0) {
                        working(tuner).forEach((k, v) -> {
                            if (k.startsWith(prefix) && !java.util.Arrays.equals(v, workingBefore.get(k))) {
                                changedAtRetry.add(k);
                            }
                        });
                    }
                    if (inExpert && BlockTrees.parameters(blocks.get(0)).values().stream() // the expert's own call
                            .allMatch(p -> BlockTrees.parameters(expert).containsValue(p))) {
                        expertAttempts.add(attempt);
                        if (poisoned[0]++ == 0) {
                            poison(BlockTrees.parameters(expert).values());
                        }
                    }
                };
                StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                tuner.fused().beforeGroup = null;
                tuner.fused().beforeNested = null;
                if (inExpert) {
                    assertEquals(List.of(0, 1), expertAttempts, "the expert back-propagated in both attempts");
                }
                if (spec.startsWith("nested")) {
                    assertTrue(comparedAtRetry[0] > 0, "nested segments visited in the retry");
                    assertEquals(List.of(), changedAtRetry, "working weights changed before the retry");
                    long changedAfter = working(tuner).entrySet().stream().filter(w -> w.getKey().startsWith(prefix)
                            && !java.util.Arrays.equals(w.getValue(), workingBefore.get(w.getKey()))).count();
                    assertTrue(changedAfter > 10, "the layer's working weights updated after it: " + changedAfter);
                }
                assertEquals(spec.startsWith("nested"), tuner.fused().nestedGroups > 0,
                        spec + ": nested groups updated inside the layers");
                assertTrue(!r.skipped() && Double.isFinite(r.loss()), r.toString());
                List<String> expected = new ArrayList<>(visits);
                expected.add(expected.indexOf("layer " + layer), "layer " + layer);
                assertEquals(expected, order, spec + ": layer " + layer + " back-propagated twice, the rest once");
                assertEquals(1, tuner.fused().retries);
                assertEquals(scale / 2, tuner.lossScale(), "the next step starts at half the scale");
                assertEquals(0, tuner.stateBytes().gradients(), "every gradient released");
                assertEquals(plainSteps, stepCounts(tuner), "every parameter updated once");
                Map<String, float[]> after = snapshot(tuner);
                assertTrue(FineTunerTest.maxDiff(plainAfter, after) < 1e-3, "weights and moments as unfused");
                float beta1 = tuner.optimizer().beta1();
                int compared = 0;
                for (String k : after.keySet()) {
                    if (!k.endsWith(".exp_avg")) {
                        continue;
                    }
                    float[] fused = gradient(before.get(k), after.get(k), beta1);
                    float[] plain = gradient(plainBefore.get(k), plainAfter.get(k), beta1);
                    double norm = norm(plain, null);
                    if (norm == 0) {
                        continue; // an expert no token reached
                    }
                    double rel = norm(fused, plain) / norm;
                    assertTrue(rel < 2e-2, spec + ", layer " + layer + " retried: " + k + " step gradient off by " + rel);
                    compared++;
                }
                assertTrue(compared > 20, "gradients compared: " + compared);
                StepResult next = tuner.step(data.trainBatch(tuner.dataPosition(), 2)); // and training goes on
                assertTrue(!next.skipped() && Double.isFinite(next.loss()), next.toString());
            }
        }
    }

    /** A gradient that stays infinite at every scale: an error naming the layer and saying what was updated. */
    @Test
    void aGradientNonFiniteAtEveryScaleIsAnError() {
        TokenDataset data = FineTunerTest.data(4);
        try (DeepSeekForCausalLM lm = model();
                FineTuner tuner = builder(lm, FineTuner.Precision.FP16).optFusedUpdate(true).build()) {
            tuner.step(data.trainBatch(tuner.dataPosition(), 2));
            int[] attempts = {0};
            tuner.fused().beforeGroup = blocks -> {
                if (isLayer(lm, blocks, 1)) {
                    attempts[0]++;
                    poison(BlockTrees.parameters(BlockTrees.get(lm, "model.layers.1")).values());
                }
            };
            NonFiniteLossException e = assertThrows(NonFiniteLossException.class,
                    () -> tuner.step(data.trainBatch(tuner.dataPosition(), 2)));
            assertTrue(e.getMessage().contains("model.layers.1") && e.getMessage().contains("minimum loss scale")
                    && e.getMessage().contains("already updated") && e.getMessage().contains("model.layers.2"),
                    e.getMessage());
            assertEquals(17, attempts[0], "from 2^16 down to the minimum scale 1: " + e.getMessage());
        }
    }

    /**
     * The FP16 fused step is one forward and one backward: the listener hears the head once and each layer once per
     * step (two passes would be twice), and the collector of that one backward recomputes each layer once.
     */
    @Test
    void anFp16StepRunsOneForwardAndBackward() {
        TokenDataset data = FineTunerTest.data(4);
        try (DeepSeekForCausalLM lm = model();
                FineTuner tuner = builder(lm, FineTuner.Precision.FP16).optFusedUpdate(true).build()) {
            List<String> order = new ArrayList<>();
            tuner.fused().beforeGroup = blocks -> order.add(label(lm, blocks));
            for (int i = 0; i < 3; i++) {
                order.clear();
                StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                assertTrue(!r.skipped(), r.toString());
                assertEquals(1, tuner.fused().passes);
                assertEquals(List.of("head", "layer 2", "layer 1", "layer 0"), order);
                assertEquals(3, tuner.lossHead.lastCollectorRecomputations, "each layer recomputed once");
            }
        }
    }

    /**
     * A tied embedding (one parameter in the embedding and the head, gradients from both ends of the backward) cannot
     * take a per-segment scale: two passes, matching the unfused step in FP16, and a forced overflow in a layer skips
     * the step with everything untouched.
     */
    @Test
    void aTiedEmbeddingTakesTwoPasses() throws Exception {
        Map<String, Map<String, float[]>> runs = new LinkedHashMap<>();
        Map<String, List<Boolean>> skips = new LinkedHashMap<>();
        for (boolean fused : new boolean[] {false, true}) {
            TokenDataset data = FineTunerTest.data(4);
            try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(
                            FineTunerTest.tinyBuilder().tieWordEmbeddings(true).build(), 8, Device.cpu(),
                            DataType.FLOAT32);
                    FineTuner tuner = builder(lm, FineTuner.Precision.FP16).optFusedUpdate(fused).build()) {
                tuner.rowwiseGradients = false;
                List<Boolean> skipped = new ArrayList<>();
                for (int i = 0; i < 4; i++) {
                    skipped.add(tuner.step(data.trainBatch(tuner.dataPosition(), 2)).skipped());
                    if (fused) {
                        assertTrue(tuner.fused().twoPass());
                        assertEquals(2, tuner.fused().passes);
                    }
                }
                skips.put("fused=" + fused, skipped);
                runs.put("fused=" + fused, snapshot(tuner));
                if (fused) {
                    Map<String, float[]> before = snapshot(tuner);
                    float scale = tuner.lossScale();
                    tuner.fused().beforeGroup = blocks -> {
                        if (isLayer(lm, blocks, 0) && tuner.fused().checking()) {
                            poison(BlockTrees.parameters(BlockTrees.get(lm, "model.layers.0")).values());
                        }
                    };
                    assertTrue(tuner.step(data.trainBatch(tuner.dataPosition(), 2)).skipped());
                    assertEquals(scale / 2, tuner.lossScale());
                    Map<String, float[]> after = snapshot(tuner);
                    for (String k : before.keySet()) {
                        assertArrayEquals(before.get(k), after.get(k), k + " untouched");
                    }
                }
            }
        }
        assertEquals(skips.get("fused=false"), skips.get("fused=true"), "the same steps skipped");
        assertTrue(skips.get("fused=true").contains(false), "some step taken: " + skips);
        double d = FineTunerTest.maxDiff(runs.get("fused=false"), runs.get("fused=true"));
        assertTrue(d < 1e-3, "tied FP16 fused vs unfused " + d);
    }

    private static Map<String, Long> stepCounts(FineTuner tuner) {
        Map<String, Long> out = new LinkedHashMap<>();
        for (Map.Entry<String, Parameter> e : tuner.parameters().entrySet()) {
            out.put(e.getKey(), tuner.optimizer().stepCount(e.getValue().getId()));
        }
        return out;
    }

    /** The step's gradient from the first moment before and after it: {@code (m3 - beta1 m2) / (1 - beta1)}. */
    private static float[] gradient(float[] m2, float[] m3, float beta1) {
        float[] g = new float[m3.length];
        for (int i = 0; i < g.length; i++) {
            g[i] = (m3[i] - beta1 * (m2 == null ? 0 : m2[i])) / (1 - beta1);
        }
        return g;
    }

    /** The norm of {@code a - b} ({@code b} null: of {@code a}). */
    private static double norm(float[] a, float[] b) {
        double s = 0;
        for (int i = 0; i < a.length; i++) {
            double x = a[i] - (b == null ? 0 : b[i]);
            s += x * x;
        }
        return Math.sqrt(s);
    }

    private static void poison(Iterable<Parameter> params) {
        for (Parameter p : params) {
            if (!p.requiresGradient()) {
                continue;
            }
            NDArray g = JniUtils.getGradient((PtNDArray) p.getArray());
            if (g == null) {
                continue;
            }
            boolean gradMode = JniUtils.isGradMode();
            JniUtils.setGradMode(false);
            try (ai.djl.ndarray.NDManager t = g.getManager().newSubManager()) {
                g.attach(t); // with the scalar set(Number) makes in g's manager
                g.set(new ai.djl.ndarray.index.NDIndex("0"), Float.POSITIVE_INFINITY);
            } finally {
                JniUtils.setGradMode(gradMode);
            }
            return;
        }
    }

    private static Map<String, float[]> working(FineTuner tuner) {
        Map<String, float[]> out = new LinkedHashMap<>();
        for (Map.Entry<String, Parameter> e : tuner.parameters().entrySet()) {
            out.put(e.getKey(), e.getValue().getArray().toType(DataType.FLOAT32, true).toFloatArray());
        }
        return out;
    }

    /**
     * Many FP16 fused steps, every third with a layer retried at a lower scale (the scale then grows back only after
     * clean steps, so retries stay possible): the model's managed arrays stay flat, no gradient buffer survives a
     * step, and the loss goes down.
     */
    @Test
    void manyFp16StepsWithRetriesKeepMemoryFlat() {
        for (String spec : new String[] {"all", "every:2"}) {
            TokenDataset data = FineTunerTest.data(11);
            try (DeepSeekForCausalLM lm = model();
                    FineTuner tuner = builder(lm, FineTuner.Precision.FP16, spec).optFusedUpdate(true).build()) {
                double first = tuner.evaluate(data.heldOutBatch(0, data.heldOutSequences()));
                int arraysAfterWarmup = -1;
                int[] step = {0};
                tuner.fused().beforeGroup = blocks -> {
                    if (step[0] % 3 == 2 && isLayer(lm, blocks, 0) && tuner.fused().retries == 0) {
                        poison(BlockTrees.parameters(BlockTrees.get(lm, "model.layers.0")).values());
                    }
                };
                int retried = 0;
                for (int i = 0; i < 16; i++) {
                    step[0] = i;
                    StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                    assertTrue(!r.skipped(), r.toString());
                    retried += tuner.fused().retries;
                    assertEquals(0, tuner.stateBytes().gradients(), spec + " step " + i);
                    if (i == 2) {
                        arraysAfterWarmup = lm.manager().getManagedArrays().size();
                    }
                }
                assertEquals(5, retried, spec);
                assertEquals(arraysAfterWarmup, lm.manager().getManagedArrays().size(), spec + ": arrays leak per step");
                double after = tuner.evaluate(data.heldOutBatch(0, data.heldOutSequences()));
                assertTrue(after < first, spec + ": held-out loss " + first + " -> " + after);
            }
        }
    }

    /** N fused steps, checkpoint, restore into a fresh run, M more: the weights of N + M uninterrupted fused steps. */
    @Test
    void fusedRunResumesBitForBit() throws Exception {
        for (FineTuner.Precision p : FineTuner.Precision.values()) {
            TokenDataset data = FineTunerTest.data(4);
            Map<String, float[]> straight;
            try (DeepSeekForCausalLM lm = model(); FineTuner tuner = builder(lm, p).optFusedUpdate(true).build()) {
                for (int i = 0; i < 4; i++) {
                    tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                }
                straight = snapshot(tuner);
            }
            Path ckpt = tmp.resolve("ckpt-" + p);
            try (DeepSeekForCausalLM lm = model(); FineTuner tuner = builder(lm, p).optFusedUpdate(true).build()) {
                for (int i = 0; i < 2; i++) {
                    tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                }
                tuner.saveCheckpoint(ckpt);
            }
            try (DeepSeekForCausalLM lm = model(); FineTuner tuner = builder(lm, p).optFusedUpdate(true).build()) {
                tuner.restoreCheckpoint(ckpt);
                for (int i = 0; i < 2; i++) {
                    tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                }
                Map<String, float[]> resumed = snapshot(tuner);
                for (String k : straight.keySet()) {
                    assertArrayEquals(straight.get(k), resumed.get(k), p + " " + k);
                }
            }
        }
    }
}
