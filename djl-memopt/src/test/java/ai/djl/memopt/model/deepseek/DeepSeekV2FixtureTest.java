package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.training.ParameterStore;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** DeepSeek-V2 (softmax router, q_proj, YaRN, complex-pair rope) against transformers 5.17's outputs. */
class DeepSeekV2FixtureTest {

    private static NDManager manager;
    private static SafetensorsFile reference;
    private static DeepSeekForCausalLM lm;

    @BeforeAll
    static void load() throws Exception {
        manager = NDManager.newBaseManager();
        reference = SafetensorsFile.open(Fixtures.V2.resolve("reference.safetensors"));
        lm = DeepSeekLoader.load(Fixtures.V2, manager, DataType.FLOAT32);
    }

    @AfterAll
    static void close() throws Exception {
        reference.close();
        manager.close();
    }

    @Test
    void configIsTheV2Variant() {
        DeepSeekConfig c = lm.config();
        assertFalse(c.isV3());
        assertFalse(c.qLoraRank().isPresent());
        assertTrue(c.isYarn());
        assertEquals(4.0, c.ropeFactor());
        assertEquals("greedy", c.topkMethod());
        assertTrue(((MultiHeadLatentAttention) Blocks2.attn(lm, 0)).qProj() != null);
    }

    @Test
    void logitsAndLossMatchTransformers() throws Exception {
        try (NDManager m = manager.newSubManager()) {
            NDArray ids = reference.load(m, "input_ids");
            ParameterStore ps = new ParameterStore(m, false);
            NDArray logits = lm.forward(ps, new NDList(ids), false).head();
            float d = Fixtures.maxAbsDiff(logits, reference.load(m, "logits"));
            System.out.printf("V2 logits max abs diff %.3g%n", d);
            assertTrue(d < 1e-4, "logits differ by " + d);
            float loss = CausalLmLoss.mean(logits, ids).getFloat();
            float ref = reference.load(m, "loss").getFloat();
            System.out.printf("V2 loss %.8f vs %.8f%n", loss, ref);
            assertEquals(ref, loss, 1e-5 * Math.abs(ref));
        }
    }

    @Test
    void greedyGenerationMatchesTransformers() throws Exception {
        try (NDManager m = manager.newSubManager()) {
            long[] prompt = reference.load(m, "greedy_prompt").toLongArray();
            long[] expected = reference.load(m, "greedy_output").toLongArray();
            assertArrayEquals(expected, Fixtures.greedy(lm, m, prompt, expected.length - prompt.length));
        }
    }

    /** Path helper. */
    static final class Blocks2 {
        static Object attn(DeepSeekForCausalLM lm, int layer) {
            return ((DeepSeekDecoderLayer) lm.model().layers().get(layer)).selfAttn();
        }
    }
}
