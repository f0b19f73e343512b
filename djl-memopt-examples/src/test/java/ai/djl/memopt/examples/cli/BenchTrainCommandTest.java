package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.examples.bench.SyntheticCheckpoint;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.lora.LoraReport;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class BenchTrainCommandTest {

    @TempDir Path tmp;

    @Test
    void dataParallelReportsTheScalingEfficiency() {
        String[] r = FinetuneCommandTest.run("bench", "train", "--preset", "bench-tiny", "--mode", "fp16", "--batch",
                "1", "--seq", "16", "--steps", "2", "--heap", "256m", "--timeout", "300", "--devices", "cpu,cpu",
                "--json");
        assertEquals("0", r[0], r[2]);
        String[] lines = r[1].trim().split("\n");
        assertEquals(1, lines.length, r[1]);
        JsonObject o = JsonParser.parseString(lines[0]).getAsJsonObject();
        assertEquals("cpu,cpu", o.get("device").getAsString());
        assertEquals(2, o.get("replicas").getAsInt());
        double tps = o.get("tokens_per_second").getAsDouble();
        assertEquals(2 * 16 / o.get("median_step_seconds").getAsDouble(), tps, 1e-6 * tps, "2 replicas x 1 x 16");
        double one = o.get("single_device_tokens_per_second").getAsDouble();
        assertEquals(tps / (2 * one), o.get("scaling_efficiency").getAsDouble(), 1e-9);
        long weights = o.get("weights_bytes").getAsLong();
        long masters = o.get("master_bytes").getAsLong();
        // FP16 working weights and FP32 masters of the primary only: the optimizer state is held once
        assertTrue(masters > 1.9 * weights && masters < 2.1 * weights, o.toString());
        // two FP32 moments per trained parameter, once: not once per replica
        assertEquals(8 * o.get("trainable_parameters").getAsLong(), o.get("optimizer_bytes").getAsLong(),
                o.toString());
        String[] bad = FinetuneCommandTest.run("bench", "train", "--devices", "cpu,tpu", "--mode", "fp32");
        assertEquals("1", bad[0]);
        assertTrue(bad[2].contains("--devices must be cpu, gpu, gpu:N or gpuN, got 'tpu'"), bad[2]);
    }

    @Test
    void oneModeInAFreshJvmGivesConsistentFigures() throws Exception {
        Path md = tmp.resolve("benchmarks.md");
        Files.writeString(md, "# Benchmarks\n\nintro\n");
        String[] r = FinetuneCommandTest.run("bench", "train", "--preset", "bench-tiny", "--mode", "fp32", "--batch",
                "1", "--seq", "16", "--steps", "2", "--heap", "256m", "--timeout", "300", "--out", md.toString(),
                "--chart", tmp.resolve("img/train.png").toString());
        assertEquals("0", r[0], r[2]);
        String[] lines = r[1].trim().split("\n");
        assertEquals(1, lines.length, r[1]);
        JsonObject o = JsonParser.parseString(lines[0]).getAsJsonObject();
        assertEquals("fp32", o.get("mode").getAsString());
        assertEquals("none", o.get("checkpointing").getAsString(), "fp32 mode ignores --checkpoint");
        assertEquals("bench-tiny", o.get("preset").getAsString());
        assertEquals("cpu", o.get("device").getAsString());
        assertEquals("eager", o.get("attention_kernel").getAsString(), "the CPU's default attention");
        assertEquals(2, o.get("steps").getAsInt());
        long peak = o.get("peak_memory_bytes").getAsLong();
        long idle = o.get("idle_memory_bytes").getAsLong();
        assertTrue(idle > 0 && peak >= idle, o.toString());
        long params = DeepSeekConfig.preset("bench-tiny").parameterCount();
        long weights = o.get("weights_bytes").getAsLong();
        // FP32 weights: the parameter count plus the routers' correction biases, which it leaves out (not trained)
        assertTrue(weights >= 4 * params && weights - 4 * params < 1000, weights + " vs " + params);
        long grads = o.get("gradient_bytes").getAsLong();
        long moments = o.get("optimizer_bytes").getAsLong();
        assertTrue(grads > 0.99 * weights && grads <= weights, o.toString());
        assertEquals(2 * grads, moments, o.toString()); // two FP32 moments per trained weight
        long state = o.get("state_bytes").getAsLong();
        assertEquals(weights + grads + moments, state);
        assertEquals(0, o.get("master_bytes").getAsLong());
        // at idle only the weights exist: the rest of the state is allocated by the first step
        assertEquals(peak - idle - (state - weights), o.get("activation_bytes").getAsLong());
        assertTrue(o.get("median_step_seconds").getAsDouble() > 0);
        String table = Files.readString(md, StandardCharsets.UTF_8);
        assertTrue(table.startsWith("# Benchmarks\n\nintro\n" + BenchTrainCommand.BEGIN), table);
        assertTrue(table.contains("| bench-tiny | fp32 | 1 | 16 | 2 | cpu |"), table);
        byte[] png = Files.readAllBytes(tmp.resolve("img/train.png"));
        assertTrue(png.length > 1000 && png[1] == 'P' && png[2] == 'N' && png[3] == 'G', "a PNG chart");
    }

    @Test
    void qloraStateIsAFifthOfFullFp32TrainingAtMost() throws Exception {
        String[] r = FinetuneCommandTest.run("bench", "train", "--preset", "bench-tiny", "--mode", "qlora", "--batch",
                "1", "--seq", "16", "--steps", "1", "--heap", "256m", "--timeout", "300", "--profile");
        assertEquals("0", r[0], r[2]);
        String[] out = r[1].trim().split("\n");
        JsonObject o = JsonParser.parseString(out[0]).getAsJsonObject();
        // --profile: the phases of a checkpointed step, each timed once per profiled step, and the printed table
        JsonObject profile = o.getAsJsonObject("profile");
        JsonObject phases = profile.getAsJsonObject("phase_seconds");
        for (String phase : new String[] {"forward", "loss head", "recompute L1", "backward L1", "optimizer",
            "host reads"}) {
            assertTrue(phases.has(phase) && phases.get(phase).getAsDouble() >= 0, phase + " in " + profile);
        }
        double sum = 0;
        for (String phase : phases.keySet()) {
            sum += phases.get(phase).getAsDouble();
        }
        // every moment of a profiled step is charged to exactly one phase, the host work between steps excepted
        assertTrue(sum <= profile.get("step_seconds").getAsDouble() * 1.001 + 1e-3, profile.toString());
        assertTrue(sum >= 0.5 * profile.get("step_seconds").getAsDouble(), profile.toString());
        assertEquals(2, profile.get("steps").getAsInt());
        assertTrue(r[1].contains("profile of qlora (all)") && r[1].contains("recompute L1"), r[1]);
        long params = DeepSeekConfig.preset("bench-tiny").parameterCount();
        long fp32State = 16 * params; // FP32 weights, gradients and two AdamW moments, as the fp32 mode reports
        long state = o.get("state_bytes").getAsLong();
        long packed = o.get("quantized_weight_bytes").getAsLong();
        System.out.printf("bench-tiny qlora state %d bytes = %.3f x fp32's %d%n", state, (double) state / fp32State,
                fp32State);
        assertTrue(packed > 0 && packed < params / 2, "int4 packs about half a byte per quantized weight: " + packed);
        assertTrue(o.get("trainable_parameters").getAsLong() < params / 20, o.toString());
        // the target for QLoRA: state at most 0.2 x the fp32 mode's
        assertTrue(state <= 0.2 * fp32State, state + " vs fp32 " + fp32State);
        assertTrue(o.get("last_loss").getAsDouble() > 0, o.toString());
        assertEquals("all", o.get("checkpointing").getAsString(), "qlora's default checkpointing");
    }

    @Test
    void qloraOnACheckpointStreamedIntoInt4() throws Exception {
        Path dir = tmp.resolve("tiny-bf16");
        DeepSeekConfig config = DeepSeekConfig.preset("bench-tiny");
        SyntheticCheckpoint.write(config, dir, 3, 1L << 30, null);
        String[] r = FinetuneCommandTest.run("bench", "train", "--model", dir.toString(), "--mode", "qlora", "--batch",
                "1", "--seq", "16", "--steps", "1", "--heap", "256m", "--timeout", "300");
        assertEquals("0", r[0], r[2]);
        JsonObject o = JsonParser.parseString(r[1].trim()).getAsJsonObject();
        assertEquals(dir.toString(), o.get("model").getAsString());
        assertTrue(o.get("peak_reset_after_load").getAsBoolean(), o.toString());
        // the same model quantized in memory: same packed bytes, same adapters
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, m, DataType.FLOAT32);
            QuantizationReport q = Quantizer.quantize(lm, Int4WeightOnlyConfig.builder().optGroupSize(64).build());
            LoraReport l = Lora.apply(lm, LoraConfig.builder().setRank(8).optAlpha(16).optTargetModules("q_a_proj",
                    "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj").optTargetParameters(
                    "gate_proj.weight", "up_proj.weight", "down_proj.weight").build());
            assertEquals(q.bytesAfter(), o.get("quantized_weight_bytes").getAsLong(), o.toString());
            assertEquals(l.trainableParameters(), o.get("trainable_parameters").getAsLong(), o.toString());
        }
        assertTrue(Double.isFinite(o.get("last_loss").getAsDouble()), o.toString());
        assertTrue(o.get("peak_memory_bytes").getAsLong() > 0, o.toString());

        String[] bad = FinetuneCommandTest.run("bench", "train", "--model", dir.toString(), "--mode", "fp32");
        assertNotEquals("0", bad[0]);
        assertTrue(bad[2].contains("--model needs --mode qlora"), bad[2]);
    }

    private static JsonObject result(String mode, long activation, double seconds) {
        JsonObject o = new JsonObject();
        o.addProperty("preset", "p");
        o.addProperty("mode", mode);
        o.addProperty("batch", 1);
        o.addProperty("seq", 8);
        o.addProperty("steps", 2);
        o.addProperty("device", "cpu");
        o.addProperty("peak_memory_bytes", 9_000_000L);
        o.addProperty("idle_memory_bytes", 1_000_000L);
        o.addProperty("state_bytes", 2_000_000L);
        o.addProperty("activation_bytes", activation);
        o.addProperty("median_step_seconds", seconds);
        return o;
    }

    @Test
    void tableRowsAreReplacedAndComparedWithFp32() throws Exception {
        Path md = tmp.resolve("b.md");
        Files.writeString(md, "head\n" + BenchTrainCommand.BEGIN + "\nold\n" + BenchTrainCommand.END + "\ntail\n");
        BenchTrainCommand.updateTable(md, List.of(result("fp32", 4_000_000, 2.0), result("checkpoint", 1_000_000,
                2.5)));
        BenchTrainCommand.updateTable(md, List.of(result("checkpoint", 800_000, 3.0)));
        JsonObject nested = result("checkpoint", 600_000, 3.2);
        nested.addProperty("checkpointing", "nested");
        BenchTrainCommand.updateTable(md, List.of(nested));
        String text = Files.readString(md, StandardCharsets.UTF_8);
        assertTrue(text.startsWith("head\n" + BenchTrainCommand.BEGIN), text);
        assertTrue(text.endsWith(BenchTrainCommand.END + "\ntail\n"), text);
        assertTrue(text.contains("| p | fp32 | 1 | 8 | 2 | cpu | 9.0 | 1.0 | 2.0 | 4.0 | 1.00 | 2.00 | 1.00 |"), text);
        assertTrue(text.contains("| p | checkpoint | 1 | 8 | 2 | cpu | 9.0 | 1.0 | 2.0 | 0.8 | 0.20 | 3.00 | 1.50 |"),
                text);
        assertEquals(2, text.split("\\| p \\| checkpoint").length - 1, text);
        // another policy is another row, beside the first
        assertTrue(text.contains("| p | checkpoint (nested) | 1 | 8 | 2 | cpu | 9.0 | 1.0 | 2.0 | 0.6 | 0.15 | 3.20 |"
                + " 1.60 |"), text);
    }

    /**
     * The optimizer-state options reach the worker: with the fused update every gradient is freed after the step, and
     * with the offload the masters and moments are counted on the host; the device and host parts sum to state_bytes.
     */
    @Test
    void fusedOffloadedStateIsSplitBetweenDeviceAndHost() throws Exception {
        String[] r = FinetuneCommandTest.run("bench", "train", "--preset", "bench-tiny", "--mode", "fp16+checkpoint",
                "--checkpoint", "all", "--batch", "1", "--seq", "16", "--steps", "1", "--heap", "256m",
                "--fused-update", "--offload-optimizer", "--json");
        assertEquals("0", r[0], r[2]);
        JsonObject o = JsonParser.parseString(r[1].trim().split("\n")[0]).getAsJsonObject();
        assertTrue(o.get("fused_update").getAsBoolean() && o.get("offload_optimizer").getAsBoolean(), o.toString());
        assertEquals("adamw", o.get("optimizer").getAsString());
        long device = o.get("state_device_bytes").getAsLong();
        long host = o.get("state_host_bytes").getAsLong();
        assertEquals(o.get("state_bytes").getAsLong(), device + host, o.toString());
        assertEquals(0, o.get("gradient_bytes").getAsLong(), "fused: gradients freed after the step");
        assertEquals(o.get("master_bytes").getAsLong() + o.get("optimizer_bytes").getAsLong(), host, o.toString());
        assertEquals(o.get("weights_bytes").getAsLong(), device, "only the FP16 weights stay on the device");
    }

    @Test
    void badOptionsAreRejectedBeforeAnyJvmStarts() {
        String[] r = FinetuneCommandTest.run("bench", "train", "--mode", "fp8");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("fp8"), r[2]);
        r = FinetuneCommandTest.run("bench", "train", "--preset", "huge");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("unknown preset"), r[2]);
        r = FinetuneCommandTest.run("bench", "train", "--checkpoint", "none");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("--checkpoint none: the checkpointed modes need a policy"), r[2]);
        r = FinetuneCommandTest.run("bench", "train", "--checkpoint", "every:0");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("N must be >= 1"), r[2]);
        r = FinetuneCommandTest.run("bench", "train", "--optimizer", "sgd");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("--optimizer must be adamw or adamw8bit"), r[2]);
    }
}
