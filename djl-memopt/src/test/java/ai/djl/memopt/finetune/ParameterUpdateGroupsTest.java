package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.precision.DynamicLossScaler;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;

/**
 * {@link ParameterUpdate#updateParameters} (a fused update's group through the optimizer's buckets, the GPU form)
 * against {@link ParameterUpdate#updateParameter} one by one: FP16 training of the tiny model with 8-bit AdamW, the
 * layers' parameters in two groups, the same masters, FP16 weights and 8-bit state after three steps.
 */
class ParameterUpdateGroupsTest {

    @Test
    void groupUpdateEqualsPerParameterUpdate() {
        Map<String, float[]> result0 = null;
        for (int v = 0; v < 2; v++) {
            try (NDManager m = NDManager.newBaseManager();
                    DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(FineTunerTest.tiny(), 8, Device.cpu(),
                            DataType.FLOAT32);
                    StatefulOptimizer opt = StatefulOptimizer.builder().setManager(m)
                            .optKind(StatefulOptimizer.Kind.ADAMW8BIT).optLearningRate(3e-3f).optWeightDecay(0.01f)
                            .optEightBit(64, 256).build()) {
                Map<String, Parameter> params = ParameterUpdate.uniqueParameters(lm);
                ParameterUpdate update = ParameterUpdate.fp16(lm, params, opt, DynamicLossScaler.create());
                update.gpuForms = v == 1;
                update.createGradients();
                List<String> layers = new ArrayList<>();
                List<String> rest = new ArrayList<>();
                for (String name : params.keySet()) {
                    if (params.get(name).requiresGradient()) {
                        (name.startsWith("model.layers.") ? layers : rest).add(name);
                    }
                }
                SplittableRandom r = new SplittableRandom(9);
                for (int step = 0; step < 3; step++) {
                    for (String name : params.keySet()) {
                        PtNDArray w = (PtNDArray) params.get(name).getArray();
                        if (!params.get(name).requiresGradient()) {
                            continue;
                        }
                        try (NDArray g = JniUtils.getGradient(w)) {
                            float[] values = new float[(int) g.size()];
                            for (int i = 0; i < values.length; i++) {
                                values[i] = (float) (r.nextGaussian() * 64);
                            }
                            try (NDArray src = m.create(values, g.getShape());
                                    NDArray typed = src.toType(g.getDataType(), false)) {
                                g.set(new NDIndex("..."), typed);
                            }
                        }
                    }
                    if (v == 1) {
                        update.updateParameters(layers, 128f);
                        update.updateParameters(rest, 128f);
                    } else {
                        for (String name : params.keySet()) {
                            if (params.get(name).requiresGradient()) {
                                update.updateParameter(name, 128f);
                            }
                        }
                    }
                }
                if (v == 1) {
                    List<String> ids = new ArrayList<>();
                    for (String name : layers) {
                        ids.add(params.get(name).getId());
                    }
                    assertTrue(opt.eightBit().bucketCount(ids) > 0, "the layers' group took buckets");
                }
                Map<String, float[]> out = new LinkedHashMap<>();
                for (Map.Entry<String, NDArray> e : update.fp32Weights().entrySet()) {
                    out.put(e.getKey(), e.getValue().toFloatArray());
                    NDArray working = params.get(e.getKey()).getArray();
                    out.put(e.getKey() + " (working)", working.toType(DataType.FLOAT32, false).toFloatArray());
                    for (Map.Entry<String, NDArray> s : opt.stateArrays(params.get(e.getKey()).getId()).entrySet()) {
                        out.put(e.getKey() + "." + s.getKey(), s.getValue().toType(DataType.FLOAT32, false)
                                .toFloatArray());
                    }
                }
                if (result0 == null) {
                    result0 = out;
                } else {
                    assertEquals(result0.keySet(), out.keySet());
                    for (String k : out.keySet()) {
                        assertArrayEquals(result0.get(k), out.get(k), k);
                    }
                    assertTrue(out.keySet().stream().anyMatch(k -> k.endsWith("exp_avg.code")));
                }
            }
        }
    }
}
