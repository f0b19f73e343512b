package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekDecoderLayer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.model.deepseek.DeepSeekMoE;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.testing.LoadedArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/**
 * PEFT's fused-parameter LoRA on the routed experts ({@code target_parameters: [gate_up_proj, down_proj]}) against
 * transformers' logits with PEFT's own adapter, on both expert dispatches and in FP16.
 */
class FusedExpertsLoraTest {

    static final Path MODEL = DeepSeekLoraTest.MODEL;
    static final Path MLP_ADAPTER = Path.of("src/test/resources/fixtures/tiny-deepseek-v3-lora-mlp");

    static float maxAbsDiff(NDArray a, NDArray b) {
        return DeepSeekLoraTest.maxAbsDiff(a, b);
    }

    static NDArray logits(DeepSeekForCausalLM lm, NDManager m, NDArray ids) {
        return DeepSeekLoraTest.logits(lm, m, ids);
    }

    static List<DeepSeekMoE> moes(DeepSeekForCausalLM lm) {
        List<DeepSeekMoE> out = new ArrayList<>();
        for (int i = 0; i < lm.model().layers().size(); i++) {
            Block mlp = ((DeepSeekDecoderLayer) lm.model().layers().get(i)).mlp();
            if (mlp instanceof DeepSeekMoE) {
                out.add((DeepSeekMoE) mlp);
            }
        }
        return out;
    }

    /** Every MoE of the model takes the gathered dispatch for any inference forward. */
    static void gatherAll(DeepSeekForCausalLM lm) {
        for (DeepSeekMoE moe : moes(lm)) {
            moe.setGatheredDispatchLimit(Integer.MAX_VALUE);
            assertTrue(moe.enableGatheredDispatch(), "LoRA experts must stack");
        }
    }

    @Test
    void peftFusedExpertAdapterReproducesTransformersLogitsOnBothDispatches() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(MLP_ADAPTER.resolve("reference.safetensors"));
                SafetensorsFile file = SafetensorsFile.open(MLP_ADAPTER.resolve(PeftAdapters.WEIGHTS_FILE))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
            NDArray ids = ref.load(m, "input_ids");
            NDArray expected = ref.load(m, "logits_with_adapter");
            float baseDiff = maxAbsDiff(logits(lm, m, ids), expected);

            LoraReport report = Lora.load(lm, MLP_ADAPTER);
            // 15 attention projections and, in the two MoE layers, 8 experts x (gate, up, down)
            assertEquals(15 + 2 * 8 * 3, report.wrappedPaths().size(), report.wrappedPaths().toString());
            assertFalse(report.wrappedPaths().stream().anyMatch(p -> p.contains("shared_experts")
                    || p.startsWith("model.layers.0.mlp")), "PEFT adapts neither the dense MLP nor shared experts");
            Map<String, LoraLinear> adapters = Lora.adapters(lm);
            LoraLinear gate = adapters.get("model.layers.1.mlp.experts.3.gate_proj");
            LoraLinear up = adapters.get("model.layers.1.mlp.experts.3.up_proj");
            LoraLinear down = adapters.get("model.layers.2.mlp.experts.5.down_proj");
            assertEquals(8, gate.rank(), "rank_pattern .*\\.gate_up_proj: 8");
            assertEquals(2f, gate.scale(), "alpha_pattern 16 / 8");
            assertEquals(4, down.rank());
            assertEquals(2f, down.scale());
            // expert 3's rows of the fused lora_A (E*r, in), shared by gate and up
            float[] a = file.readFloats(PeftAdapters.PREFIX + "model.layers.1.mlp.experts.base_layer.lora_A.weight");
            float[] rows = java.util.Arrays.copyOfRange(a, 3 * 8 * 64, 4 * 8 * 64);
            assertArrayEquals(rows, gate.loraA().getArray().toFloatArray(), 0f);
            assertArrayEquals(rows, up.loraA().getArray().toFloatArray(), 0f);
            // lora_B (2I, r*E): column k*E + e, gate rows first
            float[] b = file.readFloats(PeftAdapters.PREFIX + "model.layers.1.mlp.experts.base_layer.lora_B.weight");
            float[] upB = up.loraB().getArray().toFloatArray(); // (32, 8)
            assertEquals(b[(32 + 5) * 64 + 2 * 8 + 3], upB[5 * 8 + 2], 0f);

            NDArray sorted = logits(lm, m, ids);
            float diff = maxAbsDiff(sorted, expected);
            gatherAll(lm);
            float gatheredDiff = maxAbsDiff(logits(lm, m, ids), expected);
            System.out.printf("PEFT fused-expert LoRA fixture: logits max abs diff %.3g sorted, %.3g gathered "
                    + "(base model without adapter: %.3g); %s%n", diff, gatheredDiff, baseDiff, report);
            assertTrue(baseDiff > 1e-2, "the adapter must matter for this test to mean anything: " + baseDiff);
            assertTrue(diff < 1e-4, "sorted dispatch: logits_with_adapter differ by " + diff);
            assertTrue(gatheredDiff < 1e-4, "gathered dispatch: logits_with_adapter differ by " + gatheredDiff);

            // loading again onto the adapted model overwrites the experts' adapters in place
            gate.setAdapterWeights(gate.loraA().getArray().zerosLike(), gate.loraB().getArray().zerosLike());
            Lora.load(lm, MLP_ADAPTER);
            assertArrayEquals(rows, gate.loraA().getArray().toFloatArray(), 0f);
            assertTrue(maxAbsDiff(logits(lm, m, ids), expected) < 1e-4);

            // and merged into the weights
            Lora.merge(lm);
            float merged = maxAbsDiff(logits(lm, m, ids), expected);
            assertTrue(merged < 1e-4, "merged: " + merged);
        }
    }

    @Test
    void fp16AdaptersAreSavedAsF16AndLoadBack(@org.junit.jupiter.api.io.TempDir Path tmp) throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(MLP_ADAPTER.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
            Lora.apply(lm, LoraConfig.builder().setRank(2).optAlpha(4).optDataType(DataType.FLOAT16)
                    .optTargetModules("gate_proj", "up_proj", "down_proj").build());
            ai.djl.engine.Engine.getInstance().setRandomSeed(7);
            for (LoraLinear l : Lora.adapters(lm).values()) {
                l.setAdapterWeights(l.loraA().getArray(), m.randomNormal(0, 0.05f, l.loraB().getArray().getShape(),
                        DataType.FLOAT32));
            }
            NDArray ids = ref.load(m, "input_ids");
            NDArray want = logits(lm, m, ids);
            Lora.save(lm, tmp);
            try (SafetensorsFile f = SafetensorsFile.open(tmp.resolve(PeftAdapters.WEIGHTS_FILE))) {
                for (String name : f.names()) {
                    assertEquals(ai.djl.memopt.safetensors.SafetensorsDType.F16, f.info(name).dtype(), name);
                }
            }
            DeepSeekForCausalLM back = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
            Lora.load(back, tmp);
            assertEquals(DataType.FLOAT32, Lora.adapters(back).values().iterator().next().loraA().getArray()
                    .getDataType(), "a file's adapters load in the default type");
            float diff = maxAbsDiff(logits(back, m, ids), want);
            assertTrue(diff < 1e-6f, "FP16 values survive the fused form exactly: " + diff);
        }
    }

    @Test
    void fp16ModelWithFusedExpertAdapterOnBothDispatches() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(MLP_ADAPTER.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT16);
            NDArray ids = ref.load(m, "input_ids");
            NDArray expected = ref.load(m, "logits_with_adapter");
            float baseDiff = maxAbsDiff(logits(lm, m, ids), expected);
            Lora.load(lm, MLP_ADAPTER);
            float diff = maxAbsDiff(logits(lm, m, ids), expected);
            gatherAll(lm);
            float gathered = maxAbsDiff(logits(lm, m, ids), expected);
            float scale = expected.abs().max().getFloat();
            System.out.printf("PEFT fused-expert LoRA fixture on the FP16 model: logits max abs diff %.3g sorted, "
                    + "%.3g gathered, %.3g without the adapter (max |logit| %.3g)%n", diff, gathered, baseDiff, scale);
            assertTrue(diff < 2e-2 * scale && gathered < 2e-2 * scale, "FP16 logits differ by " + diff + " / "
                    + gathered);
            assertTrue(diff < baseDiff / 4, "the FP16 error must be far below the adapter's effect " + baseDiff);
        }
    }


    /** Issue 13: PEFT adapters (attention and fused experts) are loaded into libtorch's memory. */
    @Test
    void loadedAdaptersOwnTheirMemory() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            NDManager loaded = m.newSubManager();
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, loaded, DataType.FLOAT32);
            Lora.load(lm, MLP_ADAPTER);
            Map<String, NDArray> arrays = LoadedArrays.of(lm);
            assertTrue(arrays.keySet().stream().anyMatch(n -> n.contains("experts") && n.contains("lora")),
                    arrays.keySet().toString());
            LoadedArrays.assertOwned(arrays, loaded);
        }
    }
}
