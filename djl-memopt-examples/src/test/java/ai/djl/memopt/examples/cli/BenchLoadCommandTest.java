package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class BenchLoadCommandTest {

    @TempDir Path tmp;

    @Test
    void synthesizesThenLoadsInAFreshJvm() throws Exception {
        Path dir = tmp.resolve("tiny-bf16");
        CliRun r = CliRun.run("bench", "load", "--model", dir.toString(), "--synthesize", "bench-tiny",
                "--scheme", "int4", "--forward-tokens", "4", "--heap", "1g", "--timeout", "300");
        assertEquals(0, r.exitCode, r.err);
        String[] lines = r.out.trim().split("\n");
        assertEquals(2, lines.length, r.out);
        JsonObject synth = JsonParser.parseString(lines[0]).getAsJsonObject();
        assertEquals("bench-tiny", synth.get("synthesized").getAsString());
        JsonObject o = JsonParser.parseString(lines[1]).getAsJsonObject();
        assertEquals("int4", o.get("scheme").getAsString());
        long checkpoint = o.get("checkpoint_bytes").getAsLong();
        long total = 0;
        try (var files = Files.list(dir)) {
            for (Path p : (Iterable<Path>) files.filter(p -> p.toString().endsWith(".safetensors"))::iterator) {
                total += Files.size(p);
            }
        }
        assertEquals(total, checkpoint);
        long model = o.get("model_bytes").getAsLong();
        assertEquals(model, o.get("float_bytes").getAsLong() + o.get("quantized_bytes").getAsLong());
        assertEquals(o.get("report_bytes_after").getAsLong(), o.get("quantized_bytes").getAsLong());
        // int4 codes with per-group scales: about a seventh of the same layers in FP32
        assertTrue(o.get("quantized_bytes").getAsLong() < 0.2 * o.get("report_bytes_before").getAsLong(),
                o.toString());
        assertTrue(o.get("peak").getAsLong() >= o.get("rss_after").getAsLong(), o.toString());
        assertTrue(o.get("logits_finite").getAsBoolean(), o.toString());
        assertEquals("(1, 4, 4096)", o.get("logits_shape").getAsString());

        // a complete checkpoint is not rewritten
        long modified = Files.getLastModifiedTime(dir.resolve("config.json")).toMillis();
        CliRun again = CliRun.run("bench", "load", "--model", dir.toString(), "--synthesize", "bench-tiny",
                "--synthesize-only");
        assertEquals(0, again.exitCode, again.err);
        assertTrue(again.err.contains("already holds a checkpoint"), again.err);
        assertEquals(modified, Files.getLastModifiedTime(dir.resolve("config.json")).toMillis());
    }

    @Test
    void badOptionsAreRejectedBeforeAnyWork() {
        CliRun r = CliRun.run("bench", "load", "--model", tmp.toString(), "--scheme", "int3");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("int3"), r.err);
        CliRun missing = CliRun.run("bench", "load", "--model", tmp.resolve("none").toString());
        assertNotEquals(0, missing.exitCode);
        assertTrue(missing.err.contains("no config.json"), missing.err);
    }
}
