package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.StatefulOptimizer;
import ai.djl.memopt.finetune.StepResult;
import ai.djl.memopt.finetune.TokenBatch;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.Halfs;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import ai.djl.training.ParameterStore;
import java.util.Arrays;
import java.util.HashMap;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** LoRA inside the project's training loop: with checkpointing, FP16 autocast, and on a quantized base. */
class LoraFineTunerTest {

    private static TokenBatch fixtureBatch() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(DeepSeekLoraTest.ADAPTER.resolve("reference.safetensors"))) {
            long[] ids = ref.load(m, "input_ids").toLongArray();
            return new TokenBatch(ids, 2, 12);
        }
    }

    /** Runs {@code steps} FineTuner steps; asserts only adapters move and the loss falls. */
    private static void trainOnlyAdapters(DeepSeekForCausalLM lm, FineTuner.Precision precision, String checkpoint,
            int steps) throws Exception {
        TokenBatch batch = fixtureBatch();
        ai.djl.engine.Engine.getInstance().setRandomSeed(51);
        Map<String, float[]> before = new HashMap<>();
        BlockTrees.parameters(lm).forEach((k, p) -> before.put(k, p.getArray().toFloatArray()));
        double first;
        double last;
        try (FineTuner tuner = FineTuner.builder().setModel(lm).optCheckpointing(checkpoint).optPrecision(precision)
                .optOptimizer(StatefulOptimizer.Kind.ADAMW).optLearningRate(1e-2f).build()) {
            DeepSeekLoraTest.settleGarbage();
            first = tuner.step(batch).loss();
            StepResult r = null;
            for (int i = 1; i < steps; i++) {
                DeepSeekLoraTest.settleGarbage();
                r = tuner.step(batch);
            }
            last = r.loss();
            // the trained adapters are what Lora sees through the tuner's decorations
            Map<String, LoraLinear> adapters = Lora.adapters(lm);
            assertFalse(adapters.isEmpty());
            // in FP16 the parameters hold FP16 working copies: the FP32 masters are what must not move
            Map<String, float[]> masters = new HashMap<>();
            tuner.masterWeights().forEach((name, master) -> masters.put(name, master.toFloatArray()));
            assertEquals(precision == FineTuner.Precision.FP16, !masters.isEmpty());
            // only what trains has an FP32 master: the frozen base is held once, as its FP16 working copy
            assertTrue(masters.keySet().stream().allMatch(k -> k.contains(".lora_")), masters.keySet().toString());
            int moved = 0;
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(lm).entrySet()) {
                float[] was = before.get(e.getKey());
                if (was == null) {
                    continue; // FP16 working copies the tuner added
                }
                NDArray array = e.getValue().getArray();
                float[] now = masters.containsKey(e.getKey()) ? masters.get(e.getKey())
                        : array.toType(DataType.FLOAT32, false).toFloatArray();
                boolean same = Arrays.equals(was, now);
                if (e.getKey().contains(".lora_")) {
                    moved += same ? 0 : 1;
                } else if (array.getDataType() == DataType.FLOAT16) {
                    // a frozen weight held as its FP16 working copy: its FP16 rounding, unchanged by training
                    float[] rounded = new float[was.length];
                    for (int i = 0; i < was.length; i++) {
                        rounded[i] = Halfs.f16ToFloat(Halfs.floatToF16(was[i]));
                    }
                    assertTrue(Arrays.equals(rounded, now), e.getKey() + " must stay frozen");
                } else {
                    assertTrue(same, e.getKey() + " must stay frozen");
                }
            }
            assertEquals(2 * adapters.size(), moved, "every lora_A and lora_B trained");
        }
        System.out.printf("LoRA in FineTuner (%s, checkpointing %s): loss %.4f -> %.4f over %d steps%n", precision,
                checkpoint, first, last, steps);
        assertTrue(last < first, "loss must fall: " + first + " -> " + last);
    }

    private static LoraConfig attentionAndMlp() {
        return QLoraTest.attentionAndMlp();
    }

    @Test
    void fp32WithCheckpointing() throws Exception {
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(DeepSeekLoraTest.MODEL, Device.cpu(), DataType.FLOAT32)) {
            Lora.apply(lm, attentionAndMlp());
            trainOnlyAdapters(lm, FineTuner.Precision.FP32, "all", 3);
        }
    }

    @Test
    void fp16AutocastWrapsTheBaseNotTheAdapters() throws Exception {
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(DeepSeekLoraTest.MODEL, Device.cpu(), DataType.FLOAT32)) {
            Lora.apply(lm, attentionAndMlp());
            trainOnlyAdapters(lm, FineTuner.Precision.FP16, "none", 3);
        }
    }

    @Test
    void qloraWithCheckpointingAndLoraThenQuantizeOrder() throws Exception {
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(DeepSeekLoraTest.MODEL, Device.cpu(), DataType.FLOAT32);
                DeepSeekForCausalLM other = DeepSeekLoader.load(DeepSeekLoraTest.MODEL, Device.cpu(),
                        DataType.FLOAT32);
                SafetensorsFile ref = SafetensorsFile.open(DeepSeekLoraTest.ADAPTER.resolve("reference.safetensors"))) {
            // quantize, then adapt (the usual QLoRA order) ...
            Quantizer.quantize(lm, Int8WeightOnlyConfig.builder().build());
            Lora.load(lm, DeepSeekLoraTest.ADAPTER);
            // ... or adapt, then quantize: the quantizer reaches base_layer and leaves the adapter matrices alone
            Lora.load(other, DeepSeekLoraTest.ADAPTER);
            Quantizer.quantize(other, Int8WeightOnlyConfig.builder().build());
            LoraLinear adapter = Lora.adapters(other).get("model.layers.0.self_attn.q_a_proj");
            assertTrue(adapter.base() instanceof QuantizedLinear);
            assertEquals(DataType.FLOAT32, adapter.loraA().getArray().getDataType());
            try (NDManager m = NDManager.newBaseManager()) {
                NDArray ids = ref.load(m, "input_ids");
                NDArray a = lm.forward(new ParameterStore(m, false), new NDList(ids), false).head();
                NDArray b = other.forward(new ParameterStore(m, false), new NDList(ids), false).head();
                assertEquals(0f, a.sub(b).abs().max().getFloat(), 1e-6f, "both orders give the same model");
            }
            trainOnlyAdapters(lm, FineTuner.Precision.FP32, "all", 3);
        }
    }
}
