package ai.djl.memopt.inference;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

/** {@link DecodePath#AUTO}'s per-session batch policy: the TorchScript step for small batches on a GPU only. */
@ExtendWith(OneThread.class)
class ScriptBatchPolicyTest {

    @Test
    void smallGpuBatchesTakeTheScriptLargerOnesJava() {
        ScriptBatchPolicy auto = new ScriptBatchPolicy(false, 3, Device::isGpu);
        assertNull(auto.javaReason(Device.gpu(), 1));
        assertNull(auto.javaReason(Device.gpu(1), 3));
        String why = auto.javaReason(Device.gpu(), 4);
        assertTrue(why.contains("batch 4") && why.contains(DecodePath.SCRIPT_MAX_BATCH_PROPERTY + " = 3"), why);
        assertNull(auto.javaReason(Device.cpu(), 64), "the CPU keeps the script at every batch");
        assertNull(new ScriptBatchPolicy(true, 3, Device::isGpu).javaReason(Device.gpu(), 64), "TORCHSCRIPT asked for");
        assertTrue(new ScriptBatchPolicy(false, 0, Device::isGpu).javaReason(Device.gpu(), 1) != null, "0: none");
    }

    @Test
    void thePropertySetsTheThresholdAndBadValuesAreRefused() throws IOException {
        String p = DecodePath.SCRIPT_MAX_BATCH_PROPERTY;
        try (TestModel loaded = TestModel.load(MlaCachedDecoderTest.fixture("tiny-deepseek-v3"), DataType.FLOAT32)) {
            assertEquals(DecodePath.DEFAULT_SCRIPT_MAX_BATCH, new MlaCachedDecoder(loaded.model(), Device.cpu()).scriptMaxBatch());
            try {
                System.setProperty(p, " 5 ");
                assertEquals(5, new MlaCachedDecoder(loaded.model(), Device.cpu()).scriptMaxBatch());
                System.setProperty(p, "0");
                MlaCachedDecoder none = new MlaCachedDecoder(loaded.model(), Device.cpu());
                assertEquals(0, none.scriptMaxBatch());
                assertEquals(DecodePath.TORCHSCRIPT, none.decodePath(8), "on the CPU the threshold does not apply");
                for (String bad : List.of("-1", "two", "2.5")) {
                    System.setProperty(p, bad);
                    IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                            () -> new MlaCachedDecoder(loaded.model(), Device.cpu()));
                    assertTrue(e.getMessage().contains(p) && e.getMessage().contains(bad.replace("'", ""))
                            && e.getMessage().contains("integer >= 0"), e.getMessage());
                }
            } finally {
                System.clearProperty(p);
            }
        }
    }

    @Test
    void eachSessionTakesItsBatchsPathWithTheSameTokens() throws IOException {
        Path dir = MlaCachedDecoderTest.fixture("tiny-deepseek-v2");
        List<long[]> one = List.of(new long[] {451, 340, 497, 361});
        List<long[]> three = List.of(new long[] {451, 340, 497, 361, 133, 474}, new long[] {5, 17},
                new long[] {300, 2, 44, 9});
        SamplingParams params = SamplingParams.builder().setMaxNewTokens(8).optIgnoreEos(true).build();
        try (TestModel a = TestModel.load(dir, DataType.FLOAT32);
                TestModel b = TestModel.load(dir, DataType.FLOAT32);
                NDManager m = NDManager.newBaseManager()) {
            MlaCachedDecoder auto = new MlaCachedDecoder(a.model(), Device.cpu(), ExpertDispatch.SORTED, DecodePath.AUTO);
            // the CPU treated as a GPU: batch 1 scripted, batch 3 on the Java path
            auto.stage(0).setPolicy(new ScriptBatchPolicy(false, 2, d -> true));
            assertEquals(DecodePath.TORCHSCRIPT, auto.decodePath(1));
            assertEquals(DecodePath.JAVA, auto.decodePath(3));
            assertTrue(auto.javaPathReason(3).contains("batch 3"), auto.javaPathReason(3));
            for (int batch : new int[] {1, 3}) {
                try (MlaCachedDecoder.Session s = auto.newSession(m, batch, 8)) {
                    assertEquals(auto.decodePath(batch), s.decodePath(), "batch " + batch);
                    assertEquals(auto.javaPathReason(batch), s.javaPathReason());
                }
            }
            Generator policy = new Generator(auto, null);
            Generator java = new Generator(new MlaCachedDecoder(b.model(), Device.cpu(), ExpertDispatch.SORTED,
                    DecodePath.JAVA), null);
            for (List<long[]> prompts : List.of(one, three)) {
                List<GenerationResult> p = policy.generate(m, prompts, params, null, () -> false);
                List<GenerationResult> j = java.generate(m, prompts, params, null, () -> false);
                for (int i = 0; i < prompts.size(); i++) {
                    assertArrayEquals(j.get(i).outputIds(), p.get(i).outputIds(), "batch " + prompts.size() + " row " + i);
                }
            }
        }
    }
}
