package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsFile;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class FinetuneCommandTest {

    private static final Path FIXTURE = Path.of("../djl-memopt/src/test/resources/fixtures/tiny-deepseek-v3");

    @TempDir Path tmp;

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

    /** A repeating 8-token pattern: easy to learn, so the loss must fall far. */
    private static String pattern() {
        StringBuilder sb = new StringBuilder();
        long[] motif = {5, 17, 3, 99, 42, 7, 256, 11};
        for (int i = 0; i < 96; i++) {
            if (i > 0) {
                sb.append(',');
            }
            sb.append(motif[i % motif.length]);
        }
        return sb.toString();
    }

    private static JsonObject lastJson(String stdout) {
        String[] lines = stdout.trim().split("\n");
        return JsonParser.parseString(lines[lines.length - 1]).getAsJsonObject();
    }

    private static double perplexityLoss(Path model, String ids) {
        String[] r = run("perplexity", "--model", model.toString(), "--token-ids", ids, "--seq", "32");
        assertEquals("0", r[0], r[2]);
        return lastJson(r[1]).get("loss").getAsDouble();
    }

    private void finetuneLowersTheLoss(String precision) throws Exception {
        Path out = tmp.resolve("tuned-" + precision);
        String ids = pattern();
        String[] r = run("finetune", "--model", FIXTURE.toString(), "--token-ids", ids, "--out", out.toString(),
                "--steps", "25", "--seq", "16", "--batch", "2", "--lr", "3e-3", "--checkpointing", "all",
                "--precision", precision, "--log-every", "5", "--seed", "1");
        assertEquals("0", r[0], r[2]);
        JsonObject summary = lastJson(r[1]);
        System.out.println(summary);
        assertEquals(3, summary.get("checkpointed_layers").getAsInt()); // the fixture's decoder layers
        double first = summary.get("first_loss").getAsDouble();
        double last = summary.get("last_loss").getAsDouble();
        assertTrue(last < 0.5 * first, precision + ": loss " + first + " -> " + last);
        assertTrue(Files.isRegularFile(out.resolve("finetune.json")));
        // the saved model is a loadable FP32 Hugging Face directory that scores the pattern better than the original
        try (SafetensorsFile f = SafetensorsFile.open(out.resolve("model.safetensors"))) {
            assertEquals(SafetensorsDType.F32, f.info("model.embed_tokens.weight").dtype());
            assertEquals(SafetensorsDType.F32, f.info("model.layers.0.mlp.up_proj.weight").dtype());
        }
        double before = perplexityLoss(FIXTURE, ids);
        double after = perplexityLoss(out, ids);
        System.out.printf("%s: perplexity loss on the pattern %.4f -> %.4f%n", precision, before, after);
        assertTrue(after < 0.5 * before, precision + ": perplexity loss " + before + " -> " + after);
        assertNotEquals(Files.size(FIXTURE.resolve("model.safetensors")), 0);
    }

    @Test
    void fp32FinetuneWithCheckpointing() throws Exception {
        finetuneLowersTheLoss("fp32");
    }

    @Test
    void fp16FinetuneWithCheckpointing() throws Exception {
        finetuneLowersTheLoss("fp16");
    }

    @Test
    void badOptionsFailWithAClearMessage() {
        String[] r = run("finetune", "--model", FIXTURE.toString(), "--token-ids", pattern(), "--out",
                tmp.resolve("x").toString(), "--precision", "bf16");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("BFLOAT16") && r[2].contains("use FP16"), r[2]);
        r = run("finetune", "--model", tmp.resolve("missing").toString(), "--token-ids", "1,2,3", "--out",
                tmp.resolve("y").toString(), "--seq", "2");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("does not exist"), r[2]);
        r = run("finetune", "--model", FIXTURE.toString(), "--token-ids", "1,2,3", "--out",
                tmp.resolve("z").toString(), "--seq", "16");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("fewer than one window"), r[2]);
        r = run("finetune", "--model", FIXTURE.toString(), "--token-ids", pattern(), "--out",
                tmp.resolve("w").toString(), "--checkpointing", "sqrt");
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("every:N"), r[2]);
        assertTrue(!Files.exists(tmp.resolve("x")) && !Files.exists(tmp.resolve("w")), "nothing written on error");
    }
}
