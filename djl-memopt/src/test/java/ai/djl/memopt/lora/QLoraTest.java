package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.nio.file.Path;
import java.util.Map;
import org.junit.jupiter.api.Test;

/**
 * QLoRA: LoRA adapters on the quantized DeepSeek-V3 fixture. The reference for each check is an unoptimised run of the
 * same mathematics: a float model whose projections hold the dequantized weights.
 */
class QLoraTest {

    static final Path MODEL = DeepSeekLoraTest.MODEL;
    static final Path ADAPTER = DeepSeekLoraTest.ADAPTER;
    /** Attention and, as PEFT reads these names on a MoE model, every routed expert. */
    static final String[] TARGETS = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
        "up_proj", "down_proj"};
    /** The five attention projections. */
    static final String[] ATTENTION = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"};
    /** The dense MLP and the shared experts, as parameter targets (routed experts left out). */
    static final String[] DENSE_AND_SHARED_MLP = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"};

    /** Rank 4, alpha 8 on the attention projections, the dense MLP and the shared experts: every one gets gradients. */
    static LoraConfig attentionAndMlp() {
        return LoraConfig.builder().setRank(4).optAlpha(8).optTargetModules(ATTENTION)
                .optTargetParameters(DENSE_AND_SHARED_MLP).build();
    }

    private static float maxAbsDiff(NDArray a, NDArray b) {
        try (NDArray d = a.toType(DataType.FLOAT32, false).sub(b.toType(DataType.FLOAT32, false)).abs();
                NDArray max = d.max()) {
            return max.getFloat();
        }
    }

    private static NDArray logits(Block lm, NDManager m, NDArray ids, boolean training) {
        return lm.forward(new ParameterStore(m, false), new NDList(ids), training).head();
    }

    /** The float model whose every quantized projection of {@code quantized} is replaced by its dequantized weight. */
    private static DeepSeekForCausalLM dequantizedTwin(DeepSeekForCausalLM quantized, NDManager m) throws Exception {
        DeepSeekForCausalLM twin = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
        for (Map.Entry<String, Block> e : BlockTrees.walk(quantized).entrySet()) {
            if (e.getValue() instanceof QuantizedLinear) {
                NDArray w = ((QuantizedLinear) e.getValue()).weight(m);
                BlockTrees.get(twin, e.getKey()).getParameters().get("weight").getArray().intern(w);
            }
        }
        return twin;
    }

    private static void fixtureAdapterOnQuantizedModel(QuantizationConfig scheme) throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(ADAPTER.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
            Quantizer.quantize(lm, scheme);
            DeepSeekForCausalLM twin = dequantizedTwin(lm, m);
            NDArray ids = ref.load(m, "input_ids");
            float baseError;
            try (SafetensorsFile baseRef = SafetensorsFile.open(MODEL.resolve("reference.safetensors"))) {
                baseError = maxAbsDiff(logits(lm, m, baseRef.load(m, "input_ids"), false), baseRef.load(m, "logits"));
            }
            // a sanity bound only (the tight check is the dequantized twin): the adapted model's quantization error
            // is of the order of the base model's (measured: int8 1.1x, int4 g32 2.8x on this random tiny model)
            float bound = 4 * baseError;
            NDArray withoutAdapter = logits(lm, m, ids, false);
            LoraReport report = Lora.load(lm, ADAPTER);
            Lora.load(twin, ADAPTER);
            int onQuantized = 0;
            for (String path : report.wrappedPaths()) {
                onQuantized += Lora.adapters(lm).get(path).base() instanceof QuantizedLinear ? 1 : 0;
            }
            // int4 with groups of 32 leaves kv_b_proj (16 inputs) in float: the adapter sits on a Linear there
            assertTrue(onQuantized >= 12, onQuantized + " adapters on quantized projections");
            NDArray q = logits(lm, m, ids, false);
            float vsTwin = maxAbsDiff(q, logits(twin, m, ids, false));
            float vsTransformers = maxAbsDiff(q, ref.load(m, "logits_with_adapter"));
            System.out.printf("QLoRA %s: logits vs dequantized twin %.3g, vs transformers' FP32 adapter %.3g "
                    + "(quantized base vs FP32 base: %.3g)%n", scheme.describe(), vsTwin, vsTransformers, baseError);
            assertTrue(vsTwin < 1e-4, "same math as the dequantized model: " + vsTwin);
            assertTrue(vsTransformers < bound, "quantization error bound: " + vsTransformers);

            // merging hands back full-precision weights: the merged model equals the twin's merge
            NDArray beforeMerge = q;
            Lora.merge(lm);
            assertTrue(BlockTrees.get(lm, "model.layers.0.self_attn.q_a_proj") instanceof Linear);
            float merged = maxAbsDiff(beforeMerge, logits(lm, m, ids, false));
            System.out.printf("QLoRA %s merged: %.3g vs unmerged%n", scheme.describe(), merged);
            assertTrue(merged < 1e-5, "merged vs unmerged " + merged);
            // ... ready to be quantized again
            Quantizer.quantize(lm, scheme);
            assertTrue(BlockTrees.get(lm, "model.layers.0.self_attn.q_a_proj") instanceof QuantizedLinear);
            float requantized = maxAbsDiff(beforeMerge, logits(lm, m, ids, false));
            float effect = maxAbsDiff(beforeMerge, withoutAdapter);
            System.out.printf("QLoRA %s re-quantized after merge: %.3g vs unmerged (the adapter moves logits by %.3g)%n",
                    scheme.describe(), requantized, effect);
            // quantizing W + scale B A again costs accuracy (B A is large in this fixture), but the adapter survives
            assertTrue(requantized < 0.25f * effect, "re-quantized " + requantized + " vs adapter effect " + effect);
        }
    }

    @Test
    void int8BaseWithFixtureAdapter() throws Exception {
        fixtureAdapterOnQuantizedModel(Int8WeightOnlyConfig.builder().build());
    }

    @Test
    void int4BaseWithFixtureAdapter() throws Exception {
        fixtureAdapterOnQuantizedModel(Int4WeightOnlyConfig.builder().optGroupSize(32).build());
    }

    @Test
    void qloraGradientsEqualLoraGradientsOnTheDequantizedModel() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(ADAPTER.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
            Quantizer.quantize(lm, Int4WeightOnlyConfig.builder().optGroupSize(32).build());
            DeepSeekForCausalLM twin = dequantizedTwin(lm, m);
            LoraConfig config = LoraConfig.builder().setRank(4).optAlpha(8).optTargetModules(TARGETS).build();
            Engine.getInstance().setRandomSeed(31);
            LoraReport report = Lora.apply(lm, config);
            Lora.apply(twin, config);
            Map<String, LoraLinear> twinAdapters = SharedAdapters.randomizeAndCopy(lm, twin, m, 32);
            System.out.println("QLoRA int4: " + report);
            NDArray ids = ref.load(m, "input_ids");
            for (DeepSeekForCausalLM model : new DeepSeekForCausalLM[] {lm, twin}) {
                DeepSeekLoraTest.settleGarbage();
                try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                    gc.backward(CausalLmLoss.mean(logits(model, m, ids, true), ids));
                }
            }
            float worst = 0;
            for (Map.Entry<String, LoraLinear> e : Lora.adapters(lm).entrySet()) {
                LoraLinear q = e.getValue();
                LoraLinear f = twinAdapters.get(e.getKey());
                for (int i = 0; i < 2; i++) {
                    Parameter pq = i == 0 ? q.loraA() : q.loraB();
                    Parameter pf = i == 0 ? f.loraA() : f.loraB();
                    NDArray gq = pq.getArray().getGradient();
                    NDArray gf = pf.getArray().getGradient();
                    float d = maxAbsDiff(gq, gf);
                    float scale = gf.abs().max().getFloat();
                    assertTrue(d <= 1e-5f + 1e-3f * scale, e.getKey() + " grad diff " + d + " of " + scale);
                    worst = Math.max(worst, d);
                }
            }
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(lm).entrySet()) {
                assertEquals(e.getKey().contains(".lora_"), e.getValue().getArray().hasGradient(), e.getKey());
            }
            System.out.printf("QLoRA int4 gradients vs LoRA on the dequantized model: max abs diff %.3g%n", worst);
            assertTrue(LinearWeightSource.weightOf(Lora.adapters(lm).get("model.layers.0.self_attn.o_proj"), m)
                    .getDataType() == DataType.FLOAT32);
        }
    }

    /** The QLoRA deployment path: a quantized artifact streamed in (no float weights), the PEFT adapter on top. */
    @Test
    void fixtureAdapterOnAStreamedQuantizedArtifact(@org.junit.jupiter.api.io.TempDir Path tmp) throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(ADAPTER.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
            Quantizer.quantize(lm, Int8WeightOnlyConfig.builder().build());
            QuantizedArtifact.export(lm, tmp, ExportOptions.builder().build());
            Lora.load(lm, ADAPTER);
            DeepSeekForCausalLM streamed = QuantizedArtifact.loadDeepSeek(tmp, m, DataType.FLOAT32);
            LoraReport report = Lora.load(streamed, ADAPTER);
            assertEquals(15, report.wrappedPaths().size());
            NDArray ids = ref.load(m, "input_ids");
            float d = maxAbsDiff(logits(lm, m, ids, false), logits(streamed, m, ids, false));
            System.out.printf("QLoRA on a streamed int8 artifact: %.3g vs the in-memory QLoRA model%n", d);
            assertTrue(d < 1e-6f, "streamed artifact + adapter differs by " + d);
        }
    }
}
