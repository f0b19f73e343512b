package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

/**
 * Data-parallel replicas on the CPU ({@code cpu,cpu}: the same threads, shared collector, gradient sum and weight copy
 * as on several GPUs) against one {@link FineTuner} over the same total batch.
 */
class DataParallelFineTunerTest {

    private static final DeepSeekConfig CONFIG = FineTunerTest.tiny();

    private static DeepSeekForCausalLM model(long seed) {
        return DeepSeekForCausalLM.random(CONFIG, seed, Device.cpu(), DataType.FLOAT32);
    }

    /** Every trainable parameter's gradient (FP32 values), by name. */
    private static Map<String, float[]> gradients(DeepSeekForCausalLM lm) {
        Map<String, float[]> out = new LinkedHashMap<>();
        for (Map.Entry<String, Parameter> e : ParameterUpdate.uniqueParameters(lm).entrySet()) {
            if (!e.getValue().requiresGradient()) {
                continue;
            }
            try (NDArray g = e.getValue().getArray().getGradient(); NDArray f = g.toType(DataType.FLOAT32, true)) {
                out.put(e.getKey(), f.toFloatArray());
            }
        }
        return out;
    }

    private static Map<String, float[]> values(DeepSeekForCausalLM lm) {
        Map<String, float[]> out = new LinkedHashMap<>();
        for (Map.Entry<String, Parameter> e : ParameterUpdate.uniqueParameters(lm).entrySet()) {
            try (NDArray f = e.getValue().getArray().toType(DataType.FLOAT32, true)) {
                out.put(e.getKey(), f.toFloatArray());
            }
        }
        return out;
    }

    /** Asserts each tensor of {@code actual} within {@code relative} of {@code expected}'s largest magnitude. */
    private static void assertClose(Map<String, float[]> expected, Map<String, float[]> actual, double relative,
            String what) {
        assertEquals(expected.keySet(), actual.keySet());
        for (String name : expected.keySet()) {
            float[] a = expected.get(name);
            float[] b = actual.get(name);
            double max = 0;
            double diff = 0;
            for (int i = 0; i < a.length; i++) {
                max = Math.max(max, Math.abs(a[i]));
                diff = Math.max(diff, Math.abs(a[i] - b[i]));
            }
            assertTrue(diff <= relative * max, what + ": " + name + " differs by " + diff + " (largest " + max
                    + ")");
        }
    }

    @ParameterizedTest
    @CsvSource({"none,1", "all,1", "all,2", "nested,1"})
    void gradientsEqualOneDeviceOverTheSameTotalBatch(String checkpointing, int accumulation) {
        TokenDataset data = FineTunerTest.data(3);
        TokenBatch batch = data.trainBatch(0, 4 * accumulation);
        Map<String, float[]> single;
        try (DeepSeekForCausalLM lm = model(6);
                FineTuner tuner = FineTuner.builder().setModel(lm).optCheckpointing(checkpointing)
                        .optLossChunkTokens(24).build()) {
            tuner.accumulateGradients(batch, 1f); // the mean loss over every row at once
            single = gradients(lm);
        }
        // the second replica starts from other weights: create() gives it the first one's
        try (DeepSeekForCausalLM a = model(6);
                DeepSeekForCausalLM b = model(99);
                DataParallelFineTuner dp = DataParallelFineTuner.create(FineTuner.builder()
                        .optCheckpointing(checkpointing).optLossChunkTokens(24)
                        .optGradientAccumulation(accumulation), List.of(a, b))) {
            assertEquals(List.of(Device.cpu(), Device.cpu()), dp.devices());
            dp.accumulateGradients(batch, 1f);
            assertClose(single, gradients(a), 1e-5, checkpointing + " x" + accumulation);
            for (float[] g : gradients(b).values()) {
                for (float v : g) {
                    assertEquals(0f, v, "the replica's gradients were summed into the primary's and zeroed");
                }
            }
        }
    }

    @Test
    void loraReplicasTakeThePrimarysAdaptersAndGiveItsGradients() {
        TokenBatch batch = FineTunerTest.data(6).trainBatch(0, 4);
        LoraConfig lora = LoraConfig.builder().setRank(4).optTargetModules("q_a_proj", "kv_a_proj_with_mqa", "o_proj")
                .build();
        try (DeepSeekForCausalLM a = model(8); DeepSeekForCausalLM b = model(8)) {
            Lora.apply(a, lora);
            Lora.apply(b, lora); // other random adapter values than a's
            Map<String, float[]> parallel;
            try (DataParallelFineTuner dp = DataParallelFineTuner.create(FineTuner.builder(), List.of(a, b))) {
                Map<String, float[]> first = values(a);
                Map<String, float[]> second = values(b);
                for (String name : first.keySet()) {
                    assertArrayEquals(first.get(name), second.get(name), name);
                }
                dp.accumulateGradients(batch, 1f);
                parallel = gradients(a);
                dp.primary().update().zeroGradients();
            }
            assertTrue(parallel.keySet().stream().allMatch(n -> n.contains("lora_")), parallel.keySet().toString());
            // the same model on one device, over the whole batch
            try (FineTuner single = FineTuner.builder().setModel(a).build()) {
                single.accumulateGradients(batch, 1f);
                assertClose(gradients(a), parallel, 1e-5, "LoRA");
            }
        }
    }

    @Test
    void stepsFollowOneDeviceAndKeepTheReplicasEqual() {
        TokenDataset data = FineTunerTest.data(4);
        FineTuner.Builder settings = FineTuner.builder().optOptimizer(StatefulOptimizer.Kind.ADAMW)
                .optLearningRate(3e-3f).optWeightDecay(0.01f).optCheckpointing("all");
        Map<String, float[]> single;
        double singleLoss = 0;
        try (DeepSeekForCausalLM lm = model(2); FineTuner tuner = settings.setModel(lm).build()) {
            for (int i = 0; i < 3; i++) {
                singleLoss = tuner.step(data.trainBatch(tuner.dataPosition(), 4)).loss();
            }
            single = values(lm);
        }
        try (DeepSeekForCausalLM a = model(2);
                DeepSeekForCausalLM b = model(2);
                DataParallelFineTuner dp = DataParallelFineTuner.create(settings, List.of(a, b))) {
            StepResult r = null;
            for (int i = 0; i < 3; i++) {
                r = dp.step(data.trainBatch(dp.primary().dataPosition(), 4));
            }
            assertEquals(3, dp.primary().step());
            assertEquals(12, dp.primary().dataPosition());
            assertEquals(singleLoss, r.loss(), 1e-5 * singleLoss);
            assertClose(single, values(a), 1e-5, "weights after 3 AdamW steps");
            Map<String, float[]> first = values(a);
            Map<String, float[]> second = values(b);
            for (String name : first.keySet()) {
                assertArrayEquals(first.get(name), second.get(name), name + ": replicas hold the same weights");
            }
            assertEquals(1, dp.primary().optimizer().stateBytes() > 0 ? 1 : 0, "the primary holds the state");
        }
    }

    @Test
    void anFp16OverflowOnOneReplicaSkipsTheStepEverywhere() {
        TokenDataset data = FineTunerTest.data(5);
        DynamicLossScaler scaler = DynamicLossScaler.builder().optInitialScale(1024f).build();
        try (DeepSeekForCausalLM a = model(3);
                DeepSeekForCausalLM b = model(3);
                DataParallelFineTuner dp = DataParallelFineTuner.create(FineTuner.builder()
                        .optPrecision(FineTuner.Precision.FP16).optLossScaler(scaler).optLearningRate(1e-2f),
                        List.of(a, b))) {
            Map<String, float[]> before = values(a);
            // an inf in one gradient of the second replica only, as an FP16 overflow there would leave
            dp.afterBackward = r -> {
                if (r == 1) {
                    PtNDArray w = (PtNDArray) BlockTrees.parameters(b).get("model.layers.1.mlp.experts.2.up_proj.weight")
                            .getArray();
                    try (NDArray g = JniUtils.getGradient(w)) {
                        g.set(new NDIndex("0, 0"), Float.POSITIVE_INFINITY);
                    }
                }
            };
            StepResult skipped = dp.step(data.trainBatch(0, 4));
            assertTrue(skipped.skipped(), skipped.toString());
            assertEquals(512f, dp.primary().lossScale(), "the one scaler backed off once");
            Map<String, float[]> same = values(a);
            Map<String, float[]> other = values(b);
            for (String name : before.keySet()) {
                assertArrayEquals(before.get(name), same.get(name), name + " unchanged on the first replica");
                assertArrayEquals(before.get(name), other.get(name), name + " unchanged on the second replica");
            }
            dp.afterBackward = r -> { };
            StepResult applied = dp.step(data.trainBatch(4, 4));
            assertFalse(applied.skipped(), applied.toString());
            Map<String, float[]> after = values(a);
            assertFalse(java.util.Arrays.equals(before.get("lm_head.weight"), after.get("lm_head.weight")));
            Map<String, float[]> second = values(b);
            for (String name : after.keySet()) {
                assertArrayEquals(after.get(name), second.get(name), name + ": the FP16 working weights agree");
            }
            assertTrue(dp.primary().masterWeights().size() > 0, "FP32 masters on the primary");
        }
    }

    @Test
    void badReplicasAndBatchesAreRejected() {
        try (DeepSeekForCausalLM a = model(1);
                DeepSeekForCausalLM small = DeepSeekForCausalLM.random(FineTunerTest.tinyBuilder()
                        .numHiddenLayers(2).build(), 1, Device.cpu(), DataType.FLOAT32)) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> DataParallelFineTuner.create(FineTuner.builder(), List.of(a, small)));
            assertTrue(e.getMessage().contains("replica 1's configuration differs"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class,
                    () -> DataParallelFineTuner.create(FineTuner.builder(), List.of(a, a)));
            assertTrue(e.getMessage().contains("replica 1 must be a model of its own"), e.getMessage());
        }
        try (DeepSeekForCausalLM a = model(1);
                DeepSeekForCausalLM b = model(1);
                DataParallelFineTuner dp = DataParallelFineTuner.create(FineTuner.builder(), List.of(a, b))) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> dp.step(FineTunerTest.data(1).trainBatch(0, 3)));
            assertTrue(e.getMessage().contains("a batch of 3 rows does not split into 1 gradient-accumulation"
                    + " micro-batches of 2 equal replica shards"), e.getMessage());
        }
    }
}
