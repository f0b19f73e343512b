package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingGradientCollector;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** QLoRA with activation checkpointing: the adapters' gradients equal those of the same model without it. */
class QLoraCheckpointTest {

    @Test
    void checkpointedQloraGradientsEqualPlainOnes() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(DeepSeekLoraTest.ADAPTER.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM[] models = new DeepSeekForCausalLM[2];
            for (int i = 0; i < 2; i++) {
                models[i] = DeepSeekLoader.load(DeepSeekLoraTest.MODEL, m, DataType.FLOAT32);
                Quantizer.quantize(models[i], Int4WeightOnlyConfig.builder().optGroupSize(32).build());
            }
            List<String> wrapped = Checkpointing.wrapChildren(models[1], "model.layers", CheckpointPolicy.all());
            assertEquals(3, wrapped.size());
            LoraConfig config = QLoraTest.attentionAndMlp();
            LoraReport plain = Lora.apply(models[0], config);
            LoraReport checkpointed = Lora.apply(models[1], config);
            assertEquals(plain.wrappedPaths(), checkpointed.wrappedPaths(), "checkpointing keeps the module paths");
            Map<String, LoraLinear> other = SharedAdapters.randomizeAndCopy(models[0], models[1], m, 41);
            NDArray ids = ref.load(m, "input_ids");
            float[] losses = new float[2];
            for (int i = 0; i < 2; i++) {
                DeepSeekLoraTest.settleGarbage();
                try (GradientCollector gc = i == 0 ? Engine.getInstance().newGradientCollector()
                        : CheckpointingGradientCollector.open(m)) {
                    NDArray logits = models[i].forward(new ParameterStore(m, false), new NDList(ids), true).head();
                    NDArray loss = CausalLmLoss.mean(logits, ids);
                    losses[i] = loss.getFloat();
                    gc.backward(loss);
                }
            }
            assertEquals(losses[0], losses[1], 1e-6f);
            float worst = 0;
            for (Map.Entry<String, LoraLinear> e : Lora.adapters(models[0]).entrySet()) {
                LoraLinear c = other.get(e.getKey());
                for (int k = 0; k < 2; k++) {
                    NDArray g0 = (k == 0 ? e.getValue().loraA() : e.getValue().loraB()).getArray().getGradient();
                    NDArray g1 = (k == 0 ? c.loraA() : c.loraB()).getArray().getGradient();
                    float d = g0.sub(g1).abs().max().getFloat();
                    float scale = g0.abs().max().getFloat();
                    assertTrue(scale > 0, e.getKey());
                    assertTrue(d <= 1e-6f + 1e-4f * scale, e.getKey() + " " + d + " of " + scale);
                    worst = Math.max(worst, d);
                }
            }
            System.out.printf("QLoRA int4 + checkpointing: adapter gradients vs plain max abs diff %.3g%n", worst);
        }
    }
}
