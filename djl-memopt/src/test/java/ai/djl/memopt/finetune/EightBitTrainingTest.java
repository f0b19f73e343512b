package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.types.DataType;
import java.nio.file.Path;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * adamw8bit as a {@link StatefulOptimizer} kind inside {@link FineTuner}: its 8-bit state is what the checkpoint saves
 * and restores (N steps, save, restore, M steps = N + M steps, bit for bit, for adamw and adamw8bit, FP32 and FP16,
 * fused or not), and
 * it trains the tiny model close to FP32 AdamW.
 */
class EightBitTrainingTest {

    @TempDir Path tmp;

    private static FineTuner.Builder builder(DeepSeekForCausalLM lm, StatefulOptimizer.Kind kind, boolean fused,
            FineTuner.Precision p) {
        FineTuner.Builder b = FineTuner.builder().setModel(lm).optCheckpointing("all").optPrecision(p)
                .optOptimizer(kind).optSchedule(LearningRateSchedule.of(3e-3f, 2, 8, 0.1f)).optWeightDecay(0.01f)
                .optSeed(5).optLossChunkTokens(12).optFusedUpdate(fused);
        b.optimizerSettings().optEightBit(64, 256); // the tiny model's matrices quantized, in several blocks
        return b;
    }

    private static DeepSeekForCausalLM model() {
        return DeepSeekForCausalLM.random(FineTunerTest.tiny(), 8, Device.cpu(), DataType.FLOAT32);
    }

    private static Map<String, float[]> snapshot(FineTuner tuner) throws Exception {
        return FusedUpdateTest.snapshot(tuner); // FP32 weights and every optimizer state array
    }

    @Test
    void resumeFromACheckpointForEachOptimizer() throws Exception {
        TokenDataset data = FineTunerTest.data(4);
        for (StatefulOptimizer.Kind kind : new StatefulOptimizer.Kind[] {StatefulOptimizer.Kind.ADAMW,
                StatefulOptimizer.Kind.ADAMW8BIT}) {
            for (int v = 0; v < 4; v++) {
                boolean fused = v >= 2;
                FineTuner.Precision p = v % 2 == 1 ? FineTuner.Precision.FP16 : FineTuner.Precision.FP32;
                String what = kind + (fused ? " fused " : " ") + p;
                Map<String, float[]> straight;
                try (DeepSeekForCausalLM lm = model(); FineTuner tuner = builder(lm, kind, fused, p).build()) {
                    for (int i = 0; i < 4; i++) {
                        tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                    }
                    straight = snapshot(tuner);
                    if (kind == StatefulOptimizer.Kind.ADAMW8BIT) {
                        assertTrue(straight.keySet().stream().anyMatch(k -> k.endsWith(".exp_avg_sq.code")),
                                "8-bit moments in the state: " + straight.keySet());
                    }
                }
                Path ckpt = tmp.resolve("ckpt-" + kind + v);
                try (DeepSeekForCausalLM lm = model(); FineTuner tuner = builder(lm, kind, fused, p).build()) {
                    for (int i = 0; i < 2; i++) {
                        tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                    }
                    tuner.saveCheckpoint(ckpt);
                }
                try (DeepSeekForCausalLM lm = model(); FineTuner tuner = builder(lm, kind, fused, p).build()) {
                    tuner.restoreCheckpoint(ckpt);
                    for (int i = 0; i < 2; i++) {
                        tuner.step(data.trainBatch(tuner.dataPosition(), 2));
                    }
                    Map<String, float[]> resumed = snapshot(tuner);
                    assertEquals(straight.keySet(), resumed.keySet(), what);
                    for (String k : straight.keySet()) {
                        assertArrayEquals(straight.get(k), resumed.get(k), what + " " + k);
                    }
                }
            }
        }
    }

    /** Eight steps: the 8-bit moments train like the FP32 ones (losses close, both falling). */
    @Test
    void eightBitTrainsLikeFp32AdamW() throws Exception {
        TokenDataset data = FineTunerTest.data(4);
        double[][] losses = new double[2][8];
        StatefulOptimizer.Kind[] kinds = {StatefulOptimizer.Kind.ADAMW, StatefulOptimizer.Kind.ADAMW8BIT};
        for (int k = 0; k < 2; k++) {
            try (DeepSeekForCausalLM lm = model();
                    FineTuner tuner = builder(lm, kinds[k], false, FineTuner.Precision.FP32).build()) {
                for (int i = 0; i < 8; i++) {
                    losses[k][i] = tuner.step(data.trainBatch(tuner.dataPosition(), 2)).loss();
                }
                if (k == 1) {
                    long params = tuner.stateBytes().weights() / 4;
                    assertTrue(tuner.stateBytes().optimizer() < 8 * params / 2,
                            "8-bit moments well under FP32's 8 bytes per parameter: " + tuner.stateBytes());
                }
            }
        }
        assertTrue(losses[1][7] < losses[1][0], "adamw8bit loss falls");
        assertEquals(losses[0][7], losses[1][7], 0.02 * losses[0][7], "last losses within 2%");
    }
}
