package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.testing.ForkedJvm;
import ai.djl.memopt.testing.JavaBuffers;
import ai.djl.ndarray.types.DataType;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/**
 * Training interrupted and resumed again and again, across checkpoint boundaries, ends with the weights of the
 * uninterrupted run, bit for bit. It runs in a forked JVM: a resume that corrupts the native heap (state left pointing
 * into memory the garbage collector frees) crashes that JVM and fails the test instead of killing the suite. Between
 * sessions the fork collects garbage and fills freshly allocated native memory, so that freed memory still in use is
 * overwritten and shows.
 */
class RepeatedResumeTest {

    private static final int STEPS = 12;
    private static final int CHECKPOINT_EVERY = 2;
    /** Steps run per session before it is interrupted (the progress after its last checkpoint is lost). */
    private static final int[] SESSIONS = {3, 1, 1, 2, 1, 3, 1, 2, 3, 1, 4};

    @TempDir Path tmp;

    /** Loss-head chunks of 8 positions: from the second step on, the head's chunks are differentiated by hand. */
    private static FineTuner tuner(DeepSeekForCausalLM lm, FineTuner.Precision precision) {
        return FineTuner.builder().setModel(lm).optCheckpointing("all").optPrecision(precision)
                .optSchedule(LearningRateSchedule.of(3e-3f, 2, STEPS, 0.1f)).optWeightDecay(0.01f)
                .optOptimizer(StatefulOptimizer.Kind.ADAMW).optLossChunkTokens(16).optSeed(5).build();
    }

    /** Forked: {@code args[0]} a fresh directory, {@code args[1]} the precision. Prints the sessions, "identical". */
    public static void main(String[] args) throws Exception {
        Path dir = Path.of(args[0]);
        FineTuner.Precision precision = FineTuner.Precision.parse(args[1]);
        TokenDataset data = FineTunerTest.data(5);
        Map<String, float[]> reference;
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(FineTunerTest.tiny(), 1, Device.cpu(),
                DataType.FLOAT32); FineTuner tuner = tuner(lm, precision)) {
            while (tuner.step() < STEPS) {
                tuner.step(data.trainBatch(tuner.dataPosition(), 4));
            }
            reference = FineTunerTest.weights(tuner);
        }
        Path checkpoints = dir.resolve("checkpoints");
        Map<String, float[]> resumed = null;
        for (int session = 0; resumed == null; session++) {
            if (session == SESSIONS.length) {
                throw new AssertionError("training did not reach step " + STEPS + " in " + session + " sessions");
            }
            // the first session starts as the reference did; the others from a different initialisation each time,
            // so everything must come from the checkpoint
            try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(FineTunerTest.tiny(), session == 0 ? 1
                    : 100 + session, Device.cpu(), DataType.FLOAT32); FineTuner tuner = tuner(lm, precision)) {
                if (Files.isDirectory(checkpoints)) {
                    tuner.restoreCheckpoint(FineTuner.latestCheckpoint(checkpoints));
                }
                long from = tuner.step();
                JavaBuffers.overwriteFreedMemory();
                for (int i = 0; i < SESSIONS[session] && tuner.step() < STEPS; i++) {
                    tuner.step(data.trainBatch(tuner.dataPosition(), 4));
                    if (tuner.step() % CHECKPOINT_EVERY == 0) {
                        tuner.saveCheckpoint(checkpoints.resolve(String.format("step-%08d", tuner.step())));
                    }
                    JavaBuffers.overwriteFreedMemory();
                }
                System.out.println("session " + session + ": steps " + from + " -> " + tuner.step());
                if (tuner.step() == STEPS) {
                    resumed = FineTunerTest.weights(tuner);
                }
            }
        }
        List<String> differ = new ArrayList<>();
        for (Map.Entry<String, float[]> e : reference.entrySet()) {
            if (!Arrays.equals(e.getValue(), resumed.get(e.getKey()))) {
                differ.add(e.getKey());
            }
        }
        System.out.println(differ.isEmpty() ? "identical" : "resumed weights differ: " + differ);
    }

    @ParameterizedTest
    @ValueSource(strings = {"fp32", "fp16"})
    void resumingManyTimesGivesTheUninterruptedWeightsBitForBit(String precision) throws Exception {
        // a native crash is reported in seconds, into the temporary directory, not after the JVM's 2 minutes
        List<String> crashReport = List.of("-XX:ErrorLogTimeout=5", "-XX:-CreateCoredumpOnCrash",
                "-XX:ErrorFile=" + tmp.resolve("hs_err_%p.log"));
        ForkedJvm.Result r = ForkedJvm.run(RepeatedResumeTest.class, crashReport,
                List.of(tmp.resolve("run").toString(), precision), Duration.ofMinutes(5));
        assertEquals(0, r.exitCode(), r.output());
        assertTrue(r.output().contains("session 10: steps"), "every session ran: " + r.output());
        assertTrue(r.output().contains("identical"), r.output());
    }
}
