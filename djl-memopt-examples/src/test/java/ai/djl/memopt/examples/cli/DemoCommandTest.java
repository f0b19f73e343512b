package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.quantize.QuantScheme;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** The whole tour at toy size: every stage runs, what it keeps is usable by the other commands. */
class DemoCommandTest {

    @TempDir Path tmp;

    @Test
    void tourKeepsUsableArtifactsAndItsFiguresAgreeWithTheTools() throws Exception {
        Path out = tmp.resolve("demo");
        // --dtype fp32: the path of a CPU without FP16 arithmetic, with the FP16 showcase beside the FP32 run
        CliRun r = CliRun.run("demo", "--out", out.toString(), "--dtype", "fp32", "--steps", "6", "--batch", "2",
                "--seq", "32", "--vocab", "300", "--hidden", "32", "--layers", "2", "--max-new-tokens", "4",
                "--no-progress", "--json");
        assertEquals(0, r.exitCode, r.err);
        Map<String, JsonObject> variants = new HashMap<>();
        JsonObject training = null;
        for (String line : r.out.strip().split("\n")) {
            JsonObject o = JsonParser.parseString(line).getAsJsonObject();
            if (o.get("event").getAsString().equals("training")) {
                training = o;
            } else {
                variants.put(o.get("variant").getAsString(), o);
            }
        }
        assertEquals("fp32", training.get("precision").getAsString(), training.toString());
        assertEquals(6, training.get("steps").getAsInt());
        assertEquals(6, training.get("fp16_steps").getAsInt());
        assertTrue(training.get("fp16_max_relative_loss_difference").getAsDouble() < 0.02, training.toString());
        assertTrue(training.get("reason").getAsString().startsWith("--dtype fp32 was given"), training.toString());
        assertTrue(r.err.contains("FP16 mixed precision, 6 steps from the same start"), r.err);
        assertTrue(r.err.contains("memopt.jar generate --model " + out.resolve("int4")), "the closing hint: " + r.err);
        assertEquals(java.util.Set.of("fp32", "fp16", "int8", "int4"), variants.keySet(), r.out);
        long fp32 = variants.get("fp32").get("weight_bytes").getAsLong();
        long fp16 = variants.get("fp16").get("weight_bytes").getAsLong();
        long int8 = variants.get("int8").get("weight_bytes").getAsLong();
        long int4 = variants.get("int4").get("weight_bytes").getAsLong();
        assertEquals(fp32, 2 * fp16, "FP16 holds every weight in half the bytes");
        // the FP32 variant holds each weight once: its bytes are the saved FP32 checkpoint's (stacked experts that the
        // TorchScript decode step made views of were once counted twice); the rotary tables are the small rest
        long saved = Files.size(out.resolve("model/model.safetensors"));
        assertTrue(fp32 >= 0.9 * saved && fp32 <= 1.1 * saved, "fp32 weight bytes " + fp32 + ", checkpoint " + saved);
        assertTrue(int4 < int8 && int8 < fp32, "bytes fp32 " + fp32 + ", int8 " + int8 + ", int4 " + int4);
        for (JsonObject v : variants.values()) {
            assertTrue(v.get("perplexity").getAsDouble() > 1 && v.get("perplexity").getAsDouble() < 300, v.toString());
            assertTrue(v.get("peak_memory_bytes").getAsLong() > v.get("runtime_bytes").getAsLong()
                    && v.get("runtime_bytes").getAsLong() > 0 && v.get("tokens_per_second").getAsDouble() > 0);
            assertTrue(v.get("sample").getAsString().startsWith(DemoCommand.PROMPT), v.toString());
        }

        // what --out keeps: a model directory with its tokenizer, two verified artifacts, the report
        assertTrue(Files.isRegularFile(out.resolve("model/tokenizer.json")));
        assertTrue(QuantizedArtifact.verify(out.resolve("int8")).layers().values().stream()
                .allMatch(l -> l.scheme() == QuantScheme.INT8_WEIGHT_ONLY));
        assertTrue(QuantizedArtifact.verify(out.resolve("int4")).layers().values().stream()
                .allMatch(l -> l.scheme() == QuantScheme.INT4_WEIGHT_ONLY));
        String html = Files.readString(out.resolve("report.html"));
        assertTrue(html.contains("int4") && html.contains("data:image/png;base64,"), "report with charts");

        // the demo's held-out perplexity is the one memopt perplexity computes on the kept artifact
        CliRun p = CliRun.run("perplexity", "--model", out.resolve("int4").toString(), "--text",
                out.resolve("data/heldout.txt").toString(), "--seq", "32");
        assertEquals(0, p.exitCode, p.err);
        double tool = JsonParser.parseString(p.out.strip()).getAsJsonObject().get("perplexity").getAsDouble();
        assertEquals(variants.get("int4").get("perplexity").getAsDouble(), tool, 1e-6 * tool);
        assertNotEquals(variants.get("fp32").get("perplexity").getAsDouble(),
                variants.get("int4").get("perplexity").getAsDouble(), "the int4 variant is really quantized");
    }

    @Test
    void rejectsABadWorkerHeapBeforeDoingAnyWork() throws Exception {
        CliRun r = CliRun.run("demo", "--out", tmp.resolve("bad").toString(), "--worker-heap", "lots", "--no-progress");
        assertTrue(r.exitCode != 0, r.out);
        assertTrue(r.err.contains("--worker-heap") && r.err.contains("'lots'"), r.err);
        assertTrue(!Files.exists(tmp.resolve("bad")), "nothing written for a rejected option");
        r = CliRun.run("demo", "--out", tmp.resolve("bad").toString(), "--dtype", "bf16", "--no-progress");
        assertEquals("memopt demo: --dtype must be auto, fp32 or fp16, got 'bf16'\nTry 'memopt demo --help'\n",
                r.err.replace("\r", ""));
        assertTrue(!Files.exists(tmp.resolve("bad")), "nothing written for a rejected option");
    }
}
