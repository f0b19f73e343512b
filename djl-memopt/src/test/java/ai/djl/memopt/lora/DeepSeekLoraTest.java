package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekCheckpointWriter;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.nio.file.Path;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** LoRA on the DeepSeek-V3 model against Hugging Face PEFT's own outputs for the tiny fixture adapter. */
class DeepSeekLoraTest {

    static final Path MODEL = Path.of("src/test/resources/fixtures/tiny-deepseek-v3");
    static final Path ADAPTER = PeftAdaptersTest.FIXTURE;

    @TempDir
    Path tmp;

    /**
     * Collects garbage before a forward/backward. The model's scalars are native now ({@code nn.Scalars}); a GC here
     * makes any regression to DJL's {@code mul(Number)} on a recorded array show up as wrong gradients.
     */
    static void settleGarbage() {
        System.gc();
    }

    static float maxAbsDiff(NDArray a, NDArray b) {
        try (NDArray d = a.toType(DataType.FLOAT32, false).sub(b.toType(DataType.FLOAT32, false)).abs();
                NDArray max = d.max()) {
            return max.getFloat();
        }
    }

    static NDArray logits(DeepSeekForCausalLM lm, NDManager m, NDArray ids) {
        return lm.forward(new ParameterStore(m, false), new NDList(ids), false).head();
    }

    @Test
    void peftAdapterReproducesTransformersLogitsAndMergesIntoASavableModel() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(ADAPTER.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
            NDArray ids = ref.load(m, "input_ids");
            NDArray expected = ref.load(m, "logits_with_adapter");
            float baseDiff = maxAbsDiff(logits(lm, m, ids), expected);

            LoraReport report = Lora.load(lm, ADAPTER);
            assertEquals(15, report.wrappedPaths().size());
            assertTrue(report.wrappedPaths().contains("model.layers.2.self_attn.kv_a_proj_with_mqa"));
            NDArray adapted = logits(lm, m, ids);
            float diff = maxAbsDiff(adapted, expected);
            System.out.printf("LoRA fixture: logits max abs diff %.3g (base model without adapter: %.3g); %s%n",
                    diff, baseDiff, report);
            assertTrue(baseDiff > 1e-2, "the adapter must matter for this test to mean anything: " + baseDiff);
            assertTrue(diff < 1e-4, "logits_with_adapter differ by " + diff);

            // the absorbed-MLA path reads kv_b_proj through LinearWeightSource: it must see W + scale B A
            LoraLinear kvb = Lora.adapters(lm).get("model.layers.0.self_attn.kv_b_proj");
            NDArray w = LinearWeightSource.weightOf(kvb, m);
            NDArray direct = ((Linear) kvb.base()).getParameters().get("weight").getArray()
                    .add(kvb.loraB().getArray().matMul(kvb.loraA().getArray()).mul(2f));
            assertTrue(maxAbsDiff(w, direct) < 1e-6f);

            Lora.merge(lm);
            assertTrue(Lora.adapters(lm).isEmpty());
            NDArray merged = logits(lm, m, ids);
            float mergedDiff = maxAbsDiff(merged, expected);
            System.out.printf("LoRA fixture merged: logits max abs diff %.3g vs transformers, %.3g vs unmerged%n",
                    mergedDiff, maxAbsDiff(merged, adapted));
            assertTrue(mergedDiff < 1e-4, "merged logits differ by " + mergedDiff);

            Path out = tmp.resolve("merged");
            DeepSeekCheckpointWriter.save(lm, lm.config(), out);
            DeepSeekForCausalLM reloaded = DeepSeekLoader.load(out, m, DataType.FLOAT32);
            float reloadedDiff = maxAbsDiff(logits(reloaded, m, ids), expected);
            assertTrue(reloadedDiff < 1e-4, "saved merged model differs by " + reloadedDiff);
        }
    }

    @Test
    void halfPrecisionModelWithFp32Adapters() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(ADAPTER.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT16);
            Lora.load(lm, ADAPTER);
            LoraLinear any = Lora.adapters(lm).values().iterator().next();
            assertEquals(DataType.FLOAT32, any.loraA().getArray().getDataType());
            NDArray ids = ref.load(m, "input_ids");
            NDArray expected = ref.load(m, "logits_with_adapter");
            float diff = maxAbsDiff(logits(lm, m, ids), expected);
            float scale = expected.abs().max().getFloat();
            System.out.printf("LoRA fixture on the FP16 model: logits max abs diff %.3g (max |logit| %.3g)%n", diff,
                    scale);
            assertTrue(diff < 2e-2 * scale, "FP16 logits differ by " + diff);
        }
    }

    @Test
    void trainingMovesOnlyAdaptersLowersTheLossAndKeepsArrayCountFlat() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(ADAPTER.resolve("reference.safetensors"))) {
            Engine.getInstance().setRandomSeed(21);
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
            LoraReport report = Lora.apply(lm, LoraConfig.builder().setRank(4).optAlpha(8)
                    .optTargetModules("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                            "gate_proj", "up_proj", "down_proj")
                    .build());
            // as in PEFT on transformers 5: the expert names mean the fused routed experts, every one of them, and
            // neither the dense MLP nor the shared experts
            assertEquals(15 + 2 * 8 * 3, report.wrappedPaths().size(), report.wrappedPaths().toString());
            assertTrue(report.wrappedPaths().contains("model.layers.2.mlp.experts.7.down_proj"));
            assertFalse(report.wrappedPaths().stream().anyMatch(p -> p.contains("shared_experts")
                    || p.startsWith("model.layers.0.mlp.")), report.wrappedPaths().toString());
            System.out.println("LoRA training on tiny V3: " + report);

            Map<String, Parameter> params = BlockTrees.parameters(lm);
            Map<String, float[]> before = new java.util.HashMap<>();
            params.forEach((k, p) -> before.put(k, p.getArray().toFloatArray()));
            final float lr = 0.05f;
            float first = 0;
            float last = 0;
            int arraysAfterFirst = -1;
            for (int step = 0; step < 6; step++) {
                try (NDManager s = m.newSubManager()) {
                    // the input's manager is where the forward's results go: one per step
                    NDArray ids = ref.load(s, "input_ids");
                    ParameterStore ps = new ParameterStore(s, false);
                    float lossValue;
                    settleGarbage();
                    settleGarbage();
            try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                        NDArray logits = lm.forward(ps, new NDList(ids), true).head();
                        // the model's outputs come attached to its weights' manager (the embedding lookup's); the
                        // loss, and the ones array DJL's backward creates next to it, must go with the step
                        logits.attach(s);
                        NDArray loss = CausalLmLoss.mean(logits, ids);
                        lossValue = loss.getFloat();
                        gc.backward(loss);
                    }
                    for (Map.Entry<String, Parameter> e : params.entrySet()) {
                        NDArray arr = e.getValue().getArray();
                        boolean adapter = e.getKey().contains(".lora_");
                        assertEquals(adapter, arr.hasGradient(), e.getKey());
                        if (adapter) {
                            // plain SGD, in place and without recording
                            try (NDArray g = arr.getGradient(); NDArray update = g.mul(lr)) {
                                arr.subi(update);
                                g.subi(g); // gradients accumulate across backward calls
                            }
                        }
                    }
                    if (step == 0) {
                        first = lossValue;
                    }
                    last = lossValue;
                }
                if (step == 1) {
                    arraysAfterFirst = m.getManagedArrays().size();
                } else if (step > 1) {
                    assertEquals(arraysAfterFirst, m.getManagedArrays().size(), "arrays leak at step " + step);
                }
            }
            System.out.printf("LoRA training: loss %.5f -> %.5f over 6 steps%n", first, last);
            assertTrue(last < first - 1e-3, "loss must fall: " + first + " -> " + last);
            int changed = 0;
            int expertsChanged = 0;
            for (Map.Entry<String, Parameter> e : params.entrySet()) {
                boolean same = java.util.Arrays.equals(before.get(e.getKey()), e.getValue().getArray().toFloatArray());
                if (!e.getKey().contains(".lora_")) {
                    assertTrue(same, e.getKey() + " is frozen");
                } else if (e.getKey().contains(".experts.")) {
                    expertsChanged += same ? 0 : 1; // only experts the router picked get gradients
                } else {
                    changed += same ? 0 : 1;
                }
            }
            assertEquals(2 * 15, changed, "every attention A and B trained");
            assertTrue(expertsChanged >= 2 * 2 * 3, "routed experts' adapters trained: " + expertsChanged);
        }
    }

    /**
     * With B = 0 the adapted model computes what the base computes, and dL/dB = scale * dL/dW A^T, where dL/dW is the
     * base weight's gradient: transformers' own gradients for layer 1 and lm_head check every adapter's gradient there.
     */
    @Test
    void adapterGradientsMatchTransformersWeightGradients() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(MODEL.resolve("reference.safetensors"))) {
            Engine.getInstance().setRandomSeed(22);
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
            // module names: attention, lm_head and (PEFT's rewriting) the routed experts; parameter names: the dense
            // MLP and the shared experts
            Lora.apply(lm, LoraConfig.builder().setRank(4).optAlpha(8)
                    .optTargetModules("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                            "gate_proj", "up_proj", "down_proj", "lm_head")
                    .optTargetParameters("gate_proj.weight", "up_proj.weight", "down_proj.weight")
                    .build());
            NDArray ids = ref.load(m, "input_ids");
            settleGarbage();
            try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(ids), true).head();
                NDArray loss = CausalLmLoss.mean(logits, ids);
                assertEquals(ref.load(m, "loss").getFloat(), loss.getFloat(), 1e-5f, "B = 0: the base model's loss");
                gc.backward(loss);
            }
            int checked = 0;
            float worst = 0;
            for (Map.Entry<String, LoraLinear> e : Lora.adapters(lm).entrySet()) {
                String gradName = "grad." + e.getKey() + ".weight";
                LoraLinear l = e.getValue();
                assertEquals(0f, l.loraA().getArray().getGradient().abs().max().getFloat(), e.getKey());
                if (!ref.contains(gradName)) {
                    continue;
                }
                NDArray expected = ref.load(m, gradName).matMul(l.loraA().getArray().transpose()).mul(l.scale());
                float[] want = expected.toFloatArray();
                float[] got = l.loraB().getArray().getGradient().toFloatArray();
                for (int i = 0; i < want.length; i++) {
                    float d = Math.abs(want[i] - got[i]);
                    assertTrue(d <= 1e-5 || d <= 1e-3 * Math.abs(want[i]),
                            e.getKey() + " lora_B grad[" + i + "] " + got[i] + " vs " + want[i]);
                    worst = Math.max(worst, d);
                }
                checked++;
            }
            System.out.printf("LoRA gradients: %d adapters checked against transformers, max abs diff %.3g%n",
                    checked, worst);
            assertEquals(5 + 3 * 8 + 3 + 1, checked, "layer 1 attention, routed and shared experts, lm_head");
        }
    }
}
