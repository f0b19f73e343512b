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
        return FineTuner.builder().setModel(lm).optCheckpointing("all").optPrecision(p)
                .optSchedule(LearningRateSchedule.of(3e-3f, 2, 8, 0.1f)).optWeightDecay(0.01f).optSeed(5)
                .optLossChunkTokens(12);
    }

    private static DeepSeekForCausalLM model() {
        return DeepSeekForCausalLM.random(FineTunerTest.tiny(), 8, Device.cpu(), DataType.FLOAT32);
    }

    /** Weights (FP32 values) and optimizer moments after {@code steps} steps, fused or not. */
    private static Map<String, float[]> train(FineTuner.Precision p, boolean fused, boolean offload, int steps)
            throws Exception {
        TokenDataset data = FineTunerTest.data(4);
        try (DeepSeekForCausalLM lm = model();
                FineTuner tuner = builder(lm, p).optFusedUpdate(fused).optOffloadOptimizer(offload).build()) {
            tuner.rowwiseGradients = false; // the same (autograd) embedding and head paths in both: see docs
            for (int i = 0; i < steps; i++) {
                StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                assertTrue(Double.isFinite(r.loss()), r.toString());
                if (fused) {
                    assertTrue(tuner.fused().fusedGroups >= 3, "layers and head updated during the backward: "
                            + tuner.fused().fusedGroups);
                    assertEquals(0, tuner.stateBytes().gradients(), "every gradient released after the step");
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

    @Test
    void fusedEqualsUnfusedExactlyInFp32() throws Exception {
        Map<String, float[]> plain = train(FineTuner.Precision.FP32, false, false, 3);
        Map<String, float[]> fused = train(FineTuner.Precision.FP32, true, false, 3);
        assertEquals(plain.keySet(), fused.keySet());
        for (String k : plain.keySet()) {
            assertArrayEquals(plain.get(k), fused.get(k), k);
        }
    }

    @Test
    void fusedMatchesUnfusedInFp16() throws Exception {
        Map<String, float[]> plain = train(FineTuner.Precision.FP16, false, false, 3);
        Map<String, float[]> fused = train(FineTuner.Precision.FP16, true, false, 3);
        double d = FineTunerTest.maxDiff(plain, fused);
        System.out.printf("FP16 fused vs unfused: max difference of weights and moments %.3g%n", d);
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

    /**
     * An FP16 overflow forced into the gradient of the first layer, whose backward comes after the later layers' (and
     * the head's): the step is skipped, the scale halved, and every weight, master and moment is as before the step.
     */
    @Test
    void overflowInTheMiddleOfTheBackwardLeavesEverythingUntouched() throws Exception {
        TokenDataset data = FineTunerTest.data(4);
        try (DeepSeekForCausalLM lm = model();
                FineTuner tuner = builder(lm, FineTuner.Precision.FP16).optFusedUpdate(true).build()) {
            for (int i = 0; i < 2; i++) { // moments and step counts to keep
                assertTrue(!tuner.step(data.trainBatch(tuner.dataPosition(), 2)).skipped());
            }
            Map<String, float[]> before = snapshot(tuner);
            Map<String, float[]> workingBefore = working(tuner);
            float scale = tuner.lossScale();
            Block first = BlockTrees.get(lm, "model.layers.0");
            List<String> order = new ArrayList<>();
            tuner.fused().beforeGroup = blocks -> {
                order.add(blocks.isEmpty() ? "head" : BlockTrees.parameters(blocks.get(0)).keySet().iterator().next());
                boolean layer0 = !blocks.isEmpty() && BlockTrees.parameters(first).values().stream()
                        .anyMatch(p -> BlockTrees.parameters(blocks.get(0)).containsValue(p));
                if (layer0 && tuner.fused().checking()) {
                    poison(BlockTrees.parameters(first).values());
                }
            };
            StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 2));
            tuner.fused().beforeGroup = null;
            assertTrue(r.skipped(), r.toString());
            assertEquals(scale / 2, tuner.lossScale(), "scale halved");
            assertTrue(order.size() >= 4 && order.get(0).equals("head"), "head, then layers 2, 1, 0: " + order);
            Map<String, float[]> after = snapshot(tuner);
            assertEquals(before.keySet(), after.keySet());
            for (String k : before.keySet()) {
                assertArrayEquals(before.get(k), after.get(k), k + " untouched");
            }
            Map<String, float[]> workingAfter = working(tuner);
            for (String k : workingBefore.keySet()) {
                assertArrayEquals(workingBefore.get(k), workingAfter.get(k), k + " (FP16 working copy) untouched");
            }
            assertEquals(2, tuner.optimizer().stepCount(tuner.parameters().get("model.layers.2.self_attn.o_proj"
                    + ".weight").getId()), "later layer's step count untouched");
            StepResult next = tuner.step(data.trainBatch(tuner.dataPosition(), 2)); // and training goes on
            assertTrue(!next.skipped() && Double.isFinite(next.loss()), next.toString());
        }
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
            try {
                g.set(new ai.djl.ndarray.index.NDIndex("0"), Float.POSITIVE_INFINITY);
            } finally {
                JniUtils.setGradMode(gradMode);
                g.close();
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
