package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.inference.DecodingSession;
import ai.djl.memopt.inference.MlaCachedDecoder;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import org.junit.jupiter.api.Test;

/**
 * The absorbed-MLA decoding path reads kv_b_proj through LinearWeightSource: with the PEFT fixture adapter on, its
 * logits at every decoding step must equal transformers' logits_with_adapter at that position.
 */
class LoraCachedDecodingTest {

    @Test
    void cachedDecodingWithAdapterMatchesTransformers() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(DeepSeekLoraTest.ADAPTER.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(DeepSeekLoraTest.MODEL, m, DataType.FLOAT32);
            Lora.load(lm, DeepSeekLoraTest.ADAPTER);
            long[] ids = ref.load(m, "input_ids").toLongArray(); // (2, 12)
            NDArray expected = ref.load(m, "logits_with_adapter"); // (2, 12, V)
            int batch = 2;
            int len = 12;
            int prompt = 6;
            float worst = 0;
            try (DecodingSession s = new MlaCachedDecoder(lm, Device.cpu()).newSession(m, batch, len)) {
                for (int t = prompt; t <= len; t++) {
                    int from = t == prompt ? 0 : t - 1;
                    int n = t - from;
                    try (NDManager step = m.newSubManager()) {
                        long[] chunk = new long[batch * n];
                        long[] pos = new long[batch * n];
                        for (int b = 0; b < batch; b++) {
                            for (int j = 0; j < n; j++) {
                                chunk[b * n + j] = ids[b * len + from + j];
                                pos[b * n + j] = from + j;
                            }
                        }
                        NDArray logits = s.next(step.create(chunk, new Shape(batch, n)),
                                step.create(pos, new Shape(batch, n)), step.ones(new Shape(batch, t), DataType.INT64));
                        NDArray want = expected.get(new NDIndex(":, {}, :", t - 1));
                        float d = logits.reshape(want.getShape()).sub(want).abs().max().getFloat();
                        worst = Math.max(worst, d);
                    }
                }
            }
            System.out.printf("LoRA + absorbed MLA cached decoding: max abs diff %.3g vs transformers%n", worst);
            assertTrue(worst < 1e-4, "cached decoding with the adapter differs by " + worst);
        }
    }
}
