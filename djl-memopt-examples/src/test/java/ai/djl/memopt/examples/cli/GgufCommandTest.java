package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.examples.demo.ByteLevelBpeTrainer;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** {@code memopt gguf export/info}, and {@code --model FILE.gguf} in the other commands, with a real tokenizer. */
class GgufCommandTest {

    @TempDir
    Path tmp;

    /** The tiny V3 fixture with a byte-level BPE tokenizer of 400 tokens (below its 512 ids). */
    private Path modelWithTokenizer() throws Exception {
        Path dir = Files.createDirectories(tmp.resolve("model"));
        Path v3 = CliRun.FIXTURES.resolve("tiny-deepseek-v3");
        for (String f : new String[] {"config.json", "generation_config.json", "model.safetensors"}) {
            Files.copy(v3.resolve(f), dir.resolve(f));
        }
        ByteLevelBpeTrainer.train(List.of("The state of the Union is strong. We the people, in order to form a more "
                + "perfect union, establish justice. ".repeat(5)), 400).writeTo(dir);
        return dir;
    }

    @Test
    void ggufFilesWorkWhereverAModelDirectoryDoes() throws Exception {
        Path dir = modelWithTokenizer();
        Path file = tmp.resolve("model-q8_0.gguf");
        CliRun export = CliRun.run("gguf", "export", "--model", dir.toString(), "--type", "q8_0", "--out",
                file.toString());
        assertEquals(0, export.exitCode, export.err);
        JsonObject r = JsonParser.parseString(export.out.trim()).getAsJsonObject();
        assertEquals("gpt-2", r.get("tokenizer").getAsString());
        assertEquals("q8_0", r.get("type").getAsString());
        assertTrue(r.get("fallbacks").getAsJsonArray().toString().contains("attn_k_b"), r.toString());

        CliRun info = CliRun.run("gguf", "info", file.toString());
        assertEquals(0, info.exitCode, info.err);
        JsonObject meta = JsonParser.parseString(info.out.trim()).getAsJsonObject().getAsJsonObject("metadata");
        assertEquals("deepseek2", meta.get("general.architecture").getAsString());
        assertEquals(7, meta.get("general.file_type").getAsInt());
        assertEquals(1, meta.get("tokenizer.ggml.eos_token_id").getAsInt()); // the trained tokenizer's EOS

        Path text = Files.writeString(tmp.resolve("text.txt"), "The people of the Union establish justice.");
        double fromDir = loss(CliRun.run("perplexity", "--model", dir.toString(), "--text", text.toString()));
        double fromGguf = loss(CliRun.run("perplexity", "--model", file.toString(), "--text", text.toString()));
        assertNotEquals(fromDir, fromGguf); // Q8_0 rounding
        assertEquals(fromDir, fromGguf, 0.01 * fromDir);

        CliRun a = CliRun.run("generate", "--model", file.toString(), "--prompt", "The state of", "--max-new-tokens",
                "4", "--json");
        assertEquals(0, a.exitCode, a.err);
        assertTrue(a.out.contains("\"text\""), a.out);

        // F32 round trip: exporting the GGUF again gives the source model's loss exactly
        Path f32 = tmp.resolve("model-f32.gguf");
        assertEquals(0, CliRun.run("gguf", "export", "--model", dir.toString(), "--type", "f32", "--out",
                f32.toString()).exitCode);
        Path again = tmp.resolve("again-f32.gguf");
        assertEquals(0, CliRun.run("gguf", "export", "--model", f32.toString(), "--type", "f32", "--out",
                again.toString()).exitCode);
        assertEquals(fromDir, loss(CliRun.run("perplexity", "--model", again.toString(), "--text", text.toString())),
                1e-6);
    }

    @Test
    void badArgumentsAndFilesAreNamed() throws Exception {
        CliRun type = CliRun.run("gguf", "export", "--model", CliRun.FIXTURES.resolve("tiny-deepseek-v3").toString(),
                "--type", "q5_k", "--out", tmp.resolve("x.gguf").toString());
        assertEquals(1, type.exitCode);
        assertTrue(type.err.contains("--type must be f32, f16, q8_0 or q4_0, got 'q5_k'"), type.err);
        assertFalse(Files.exists(tmp.resolve("x.gguf")));

        Path junk = Files.write(tmp.resolve("junk.gguf"), new byte[] {'G', 'G', 'U', 'F', 9, 0, 0, 0});
        CliRun ppl = CliRun.run("perplexity", "--model", junk.toString(), "--token-ids", "1,2,3");
        assertEquals(1, ppl.exitCode);
        assertTrue(ppl.err.contains("truncated GGUF file"), ppl.err);
    }

    private static double loss(CliRun r) {
        assertEquals(0, r.exitCode, r.err);
        return JsonParser.parseString(r.out.trim()).getAsJsonObject().get("loss").getAsDouble();
    }
}
