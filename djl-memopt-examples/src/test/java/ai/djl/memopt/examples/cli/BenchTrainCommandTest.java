package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;

class BenchTrainCommandTest {

    private static final Path FIXTURE = Path.of("../djl-memopt/src/test/resources/fixtures/tiny-deepseek-v3");

    private static String[] run(String... args) {
        PrintStream out = System.out;
        PrintStream err = System.err;
        ByteArrayOutputStream o = new ByteArrayOutputStream();
        ByteArrayOutputStream e = new ByteArrayOutputStream();
        int code;
        try {
            System.setOut(new PrintStream(o, true, StandardCharsets.UTF_8));
            System.setErr(new PrintStream(e, true, StandardCharsets.UTF_8));
            code = MemoptCli.execute(args);
        } finally {
            System.setOut(out);
            System.setErr(err);
        }
        return new String[] {Integer.toString(code), o.toString(StandardCharsets.UTF_8),
            e.toString(StandardCharsets.UTF_8)};
    }

    @Test
    void oneConfigurationInProcessReportsMemoryAndTime() {
        String[] r = run("bench", "train", "--in-process", "--model", FIXTURE.toString(), "--batch", "2", "--seq",
                "16", "--steps", "2", "--checkpointing", "all", "--precision", "fp16");
        assertEquals("0", r[0], r[2]);
        JsonObject o = JsonParser.parseString(r[1].trim()).getAsJsonObject();
        System.out.println(o);
        assertEquals("all", o.get("checkpointing").getAsString());
        assertEquals("fp16", o.get("precision").getAsString());
        assertEquals(3, o.get("layers").getAsInt());
        assertTrue(o.get("parameters").getAsLong() > 100_000);
        assertTrue(o.get("peak_rss_mb").getAsDouble() >= o.get("model_rss_mb").getAsDouble());
        assertTrue(o.get("ms_per_step").getAsDouble() > 0);
        assertTrue(Float.isFinite(o.get("last_loss").getAsFloat()));
    }

    @Test
    void eachConfigurationRunsInAFreshJvm() {
        String[] r = run("bench", "train", "--model", FIXTURE.toString(), "--batch", "1", "--seq", "8", "--steps",
                "1", "--warmup", "0", "--checkpointing", "none,all");
        assertEquals("0", r[0], r[2]);
        String[] lines = r[1].trim().split("\n");
        assertEquals(2, lines.length, r[1]);
        assertEquals("none", JsonParser.parseString(lines[0]).getAsJsonObject().get("checkpointing").getAsString());
        assertEquals("all", JsonParser.parseString(lines[1]).getAsJsonObject().get("checkpointing").getAsString());
    }

    @Test
    void badSettingsFailBeforeSpawning() {
        String[] r = run("bench", "train", "--model", FIXTURE.toString(), "--precision", "fp32,bf16");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("BFLOAT16"), r[2]);
        r = run("bench", "train", "--model", FIXTURE.toString(), "--checkpointing", "every:x");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("every:x"), r[2]);
    }
}
