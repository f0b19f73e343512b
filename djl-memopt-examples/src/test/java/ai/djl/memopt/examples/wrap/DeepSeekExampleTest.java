package ai.djl.memopt.examples.wrap;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** The DeepSeek example on the tiny DeepSeek-V3 checkpoint written by transformers. */
class DeepSeekExampleTest {

    static final Path V3 = Path.of("..", "djl-memopt", "src", "test", "resources", "fixtures", "tiny-deepseek-v3")
            .toAbsolutePath().normalize();
    static final long[] IDS = DeepSeekExample.tokens(2, 12, 512);

    @Test
    void everyDecoderLayerCheckpointedGivesThePlainGradients() throws Exception {
        DeepSeekExample.CheckpointResult r = DeepSeekExample.checkpointedStep(V3, IDS, 2);
        assertEquals(List.of("0", "1", "2"), r.checkpointedLayers());
        assertEquals(r.loss(), r.checkpointedLoss(), 1e-6);
        assertTrue(r.maxGradient() > 1e-3, r.toString());
        assertTrue(r.maxGradientDiff() <= 1e-5 * r.maxGradient(), r.toString());
    }

    @Test
    void mixedPrecisionLossFollowsFp32() throws Exception {
        DeepSeekExample.PrecisionResult r = DeepSeekExample.mixedPrecision(V3, IDS, 2, 3);
        System.out.println(r.fp32Islands());
        assertEquals(0, r.skippedSteps());
        assertTrue(r.fp32Losses()[2] < r.fp32Losses()[0], "Adam on one batch lowers the loss");
        // FP16 weights and activations: the loss of the same steps within 1% of FP32
        assertTrue(r.maxRelativeLossDiff() < 1e-2, java.util.Arrays.toString(r.fp32Losses()) + " vs "
                + java.util.Arrays.toString(r.fp16Losses()));
    }

    @Test
    void quantizedLogitsStayCloseToFp32() throws Exception {
        DeepSeekExample.QuantizeResult int8 =
                DeepSeekExample.quantize(V3, Int8WeightOnlyConfig.builder().build(), IDS, 2);
        System.out.println(int8);
        assertTrue(int8.quantizedLayers() > 10, int8.toString());
        assertTrue(int8.relativeLogitsError() < 0.02, int8.toString());
        assertTrue(int8.bytesAfter() * 3.5 < int8.bytesBefore(), int8.toString());
        DeepSeekExample.QuantizeResult int4 =
                DeepSeekExample.quantize(V3, Int4WeightOnlyConfig.builder().optGroupSize(32).build(), IDS, 2);
        System.out.println(int4);
        assertTrue(int4.relativeLogitsError() < 0.2, int4.toString());
        assertTrue(int4.relativeLogitsError() > int8.relativeLogitsError(), "int4 is coarser than int8");
        assertTrue(Math.abs(int4.quantizedLoss() - int4.fp32Loss()) < 0.05 * int4.fp32Loss(), int4.toString());
    }

    @Test
    void artifactLoadsAndGeneratesThroughAPredictor(@TempDir Path tmp) throws Exception {
        Path out = tmp.resolve("int8");
        DeepSeekExample.ExportResult e =
                DeepSeekExample.exportAndLoad(V3, Int8WeightOnlyConfig.builder().build(), out, IDS, 2);
        assertEquals(0.0, e.maxLogitsDiff());
        assertTrue(e.artifactBytes() < e.sourceBytes(), e.toString());
        assertTrue(Files.isRegularFile(out.resolve("generation_config.json")), "companion files copied");

        long[] prompt = {451, 340, 497, 361, 133, 474};
        // transformers' greedy continuation of this prompt (fixture REFERENCE.json, also asserted by the library)
        long[] transformers = {198, 191, 59, 261, 76, 152, 157, 372, 445, 269, 301, 152, 157, 372, 445, 269};
        GenerationResult fp32 = DeepSeekExample.generate(V3, prompt, null, 16);
        assertArrayEquals(transformers, fp32.outputIds());
        GenerationResult int8 = DeepSeekExample.generate(out, prompt, null, 16);
        assertEquals(16, int8.outputIds().length);
        int agree = 0;
        while (agree < 16 && int8.outputIds()[agree] == transformers[agree]) {
            agree++;
        }
        System.out.println("int8 artifact greedy tokens equal to FP32 for the first " + agree + " of 16");
        assertTrue(agree >= 4, "int8 follows FP32 for the first tokens: " + agree);
    }
}
