package ai.djl.memopt.examples.demo;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.examples.cli.DemoCommand;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.TokenDataset;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Random;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Both training paths of the demo at toy size: FP32 with the FP16 showcase beside it, and FP16 throughout. */
class DemoTrainingTest {

    @TempDir Path tmp;

    private static TokenDataset data() {
        Random random = new Random(3);
        int[] stream = new int[4000];
        for (int i = 0; i < stream.length; i++) {
            stream[i] = i % 7 == 0 ? 5 : 10 + random.nextInt(40); // some structure to learn
        }
        return TokenDataset.fromTokens(stream, 16, 0.0, 7);
    }

    /** The demo's training at toy size: 2 layers of width 32, batches of 2 x 16 tokens. */
    private static DemoTraining training() {
        DeepSeekConfig config = DemoCommand.demoConfig(300, 32, 2, 16);
        return new DemoTraining(config, Device.cpu(), data(), 2, 3e-3f, 7, null);
    }

    @Test
    void fp32RunWithTheFp16ShowcaseComparesTheSameStepsAndSavesTheModel() throws Exception {
        DemoTraining.Result r = training().run(new TrainingPlan(FineTuner.Precision.FP32, 4, 3, "test"),
                tmp.resolve("model"));
        assertEquals(4, r.lossCurve().size());
        assertTrue(Files.isRegularFile(tmp.resolve("model/model.safetensors")), "the main run's model is saved");
        DemoTraining.Showcase s = r.showcase();
        assertEquals(3, s.steps());
        assertEquals(3, s.lossCurve().size());
        double worst = 0;
        for (int i = 0; i < 3; i++) {
            assertEquals(r.lossCurve().get(i)[0], s.lossCurve().get(i)[0], "step numbers line up");
            double fp32 = r.lossCurve().get(i)[1];
            worst = Math.max(worst, Math.abs(s.lossCurve().get(i)[1] - fp32) / fp32);
        }
        assertEquals(worst, s.maxRelativeLossDifference(), 1e-12);
        // the same model, seed, schedule and batches: FP16 rounding only
        assertTrue(worst > 0 && worst < 0.01, "FP16 against FP32: " + worst);
        assertEquals(0, s.skippedSteps());
        assertTrue(s.fp16TokensPerSecond() > 0 && s.fp32TokensPerSecond() > 0, s.toString());
    }

    @Test
    void fp16RunNeedsNoShowcaseAndStartsFromTheSameModel() throws Exception {
        DemoTraining training = training();
        DemoTraining.Result fp16 = training.run(new TrainingPlan(FineTuner.Precision.FP16, 2, 0, "test"),
                tmp.resolve("fp16"));
        assertNull(fp16.showcase());
        assertEquals(2, fp16.lossCurve().size());
        DemoTraining.Result fp32 = training.run(new TrainingPlan(FineTuner.Precision.FP32, 2, 0, "test"),
                tmp.resolve("fp32"));
        List<double[]> a = fp16.lossCurve();
        List<double[]> b = fp32.lossCurve();
        assertEquals(b.get(0)[1], a.get(0)[1], 0.01 * b.get(0)[1], "first step, same weights and batch");
        assertTrue(a.get(0)[1] != b.get(0)[1], "the FP16 run really computes in FP16");
    }
}
