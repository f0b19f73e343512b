package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.nio.file.Path;
import java.util.Map;
import org.junit.jupiter.api.Test;

/**
 * A model held entirely in FP16 trains: its FP32 islands (norms, router, softmax, logits, loss) are entered and left
 * with differentiable casts. DJL's {@code toType} runs without autograd, so a plain {@code toType} there would leave
 * every parameter before the first cast without a gradient.
 */
class DeepSeekFp16GradientTest {

    static final Path V3 = Path.of("src/test/resources/fixtures/tiny-deepseek-v3");

    @Test
    void fp16ModelGradientsFollowTransformersFp32Gradients() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile reference = SafetensorsFile.open(V3.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = fp16ModelRecordingGradients(m);
            Map<String, Parameter> params = BlockTrees.parameters(lm);
            NDArray ids = reference.load(m, "input_ids");
            try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(ids), true).head();
                gc.backward(CausalLmLoss.mean(logits, ids));
            }
            // the embedding is the first op of the model: its gradient crosses every cast on the way back
            for (String name : new String[] {"model.embed_tokens.weight", "model.layers.1.self_attn.q_a_proj.weight",
                "model.layers.1.mlp.experts.0.up_proj.weight", "model.layers.1.input_layernorm.weight"}) {
                float[] expected = reference.readFloats("grad." + name);
                float[] actual = gradient(params, name);
                double dot = 0;
                for (int i = 0; i < expected.length; i++) {
                    dot += expected[i] * actual[i];
                }
                double rel = relativeError(expected, actual);
                System.out.printf("FP16 grad %s: relative error %.4f%n", name, rel);
                assertTrue(dot > 0, name + ": no gradient reached it");
                // FP16 activations: a few per cent of relative error in the gradient, never a missing one
                assertTrue(rel < 0.05, name + ": FP16 gradient relative error " + rel);
            }
        }
    }

    /**
     * In FP16 on CPU each expert's token rows are padded to a multiple of 32 (a bounded set of matrix shapes for
     * oneDNN); with 24 tokens and 8 experts most rows of every expert are padding. The pad rows must neither reach the
     * output nor any gradient: every routed expert's weight gradients follow transformers' FP32 gradients (a pad row
     * leaking in would count the expert's first token many times over).
     */
    @Test
    void paddedExpertRowsAddNothingToTheGradients() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile reference = SafetensorsFile.open(V3.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = fp16ModelRecordingGradients(m);
            Map<String, Parameter> params = BlockTrees.parameters(lm);
            NDArray ids = reference.load(m, "input_ids");
            try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(ids), true).head();
                NDArray expectedLogits = reference.load(m, "logits", DataType.FLOAT32);
                double rel = relativeError(expectedLogits.toFloatArray(),
                        logits.toType(DataType.FLOAT32, false).toFloatArray());
                assertTrue(rel < 0.01, "FP16 logits relative error " + rel);
                gc.backward(CausalLmLoss.mean(logits, ids));
            }
            int checked = 0;
            for (int expert = 0; expert < 8; expert++) {
                for (String proj : new String[] {"gate_proj", "up_proj", "down_proj"}) {
                    String name = "model.layers.1.mlp.experts." + expert + "." + proj + ".weight";
                    float[] expected = reference.readFloats("grad." + name);
                    float[] actual = gradient(params, name);
                    double rel = relativeError(expected, actual);
                    if (Double.isNaN(rel)) { // no reference gradient: the expert got no token
                        for (float g : actual) {
                            assertTrue(g == 0, name + ": an expert that got no token has a gradient");
                        }
                        continue;
                    }
                    checked++;
                    assertTrue(rel < 0.05, name + ": FP16 gradient relative error " + rel);
                }
            }
            assertTrue(checked >= 12, "only " + checked + " expert weights received tokens");
        }
    }

    /** {@code |actual - expected| / |expected|} (L2 norms); NaN when {@code expected} is all zeros. */
    private static double relativeError(float[] expected, float[] actual) {
        double ee = 0;
        double err = 0;
        for (int i = 0; i < expected.length; i++) {
            ee += expected[i] * expected[i];
            err += (expected[i] - actual[i]) * (expected[i] - actual[i]);
        }
        return ee == 0 ? Double.NaN : Math.sqrt(err / ee);
    }

    /** A parameter's (FP16) gradient as FP32 values. */
    private static float[] gradient(Map<String, Parameter> params, String name) {
        return params.get(name).getArray().getGradient().toType(DataType.FLOAT32, false).toFloatArray();
    }

    /** The V3 fixture model in FP16 with every trainable parameter recording its gradient. */
    private static DeepSeekForCausalLM fp16ModelRecordingGradients(NDManager m) throws java.io.IOException {
        DeepSeekForCausalLM lm = DeepSeekLoader.load(V3, m, DataType.FLOAT16);
        for (Parameter p : BlockTrees.parameters(lm).values()) {
            if (p.requiresGradient()) {
                p.getArray().setRequiresGradient(true);
            }
        }
        return lm;
    }
}
