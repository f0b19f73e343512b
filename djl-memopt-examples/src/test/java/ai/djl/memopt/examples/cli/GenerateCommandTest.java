package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.util.Arrays;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class GenerateCommandTest {

    static final String V3 = CliRun.FIXTURES.resolve("tiny-deepseek-v3").toString();
    // reference.safetensors of the fixture: greedy_prompt and the 16 tokens transformers generates after it
    static final long[] PROMPT = {451, 340, 497, 361, 133, 474};
    static final long[] GREEDY = {198, 191, 59, 261, 76, 152, 157, 372, 445, 269, 301, 152, 157, 372, 445, 269};

    static long[] ids(JsonArray a) {
        long[] out = new long[a.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = a.get(i).getAsLong();
        }
        return out;
    }

    static JsonObject lastJsonLine(String out) {
        String[] lines = out.strip().split("\n");
        return JsonParser.parseString(lines[lines.length - 1]).getAsJsonObject();
    }

    @Test
    void greedyJsonMatchesTransformers() {
        CliRun r = CliRun.run("generate", "--model", V3, "--prompt-ids", "451,340,497,361,133,474", "--max-new-tokens", "16", "--json");
        assertEquals(0, r.exitCode, r.err);
        JsonObject o = lastJsonLine(r.out);
        assertEquals(Arrays.toString(PROMPT), Arrays.toString(ids(o.getAsJsonArray("prompt_ids"))));
        assertEquals(Arrays.toString(GREEDY), Arrays.toString(ids(o.getAsJsonArray("output_ids"))));
        assertEquals("length", o.get("finish_reason").getAsString());
        assertEquals(3L * (16 + 8) * 4, o.get("cache_bytes_per_token").getAsLong());
    }

    @Test
    void plainOutputWithoutTokenizerIsTheIds() {
        CliRun r = CliRun.run("generate", "--model", V3, "--prompt-ids", "451,340,497,361,133,474", "--max-new-tokens", "4");
        assertEquals(0, r.exitCode, r.err);
        assertEquals("198 191 59 261", r.out.strip());
    }

    @Test
    void seededSamplingIsReproducible() {
        String[] args = {"generate", "--model", V3, "--prompt-ids", "5,17,3", "--max-new-tokens", "12", "--temperature", "1.5",
            "--top-k", "50", "--seed", "9", "--json"};
        CliRun a = CliRun.run(args);
        CliRun b = CliRun.run(args);
        assertEquals(0, a.exitCode, a.err);
        assertEquals(lastJsonLine(a.out).get("output_ids"), lastJsonLine(b.out).get("output_ids"));
        CliRun greedy = CliRun.run("generate", "--model", V3, "--prompt-ids", "5,17,3", "--max-new-tokens", "12", "--json");
        assertNotEquals(lastJsonLine(a.out).get("output_ids"), lastJsonLine(greedy.out).get("output_ids"));
    }

    @Test
    void textAndChatPromptsEndToEnd(@TempDir Path tmp) throws Exception {
        String dir = CliRun.v3WithTokenizer(tmp).toString();
        CliRun text = CliRun.run("generate", "--model", dir, "--prompt", "w451 w340 w497", "--max-new-tokens", "8", "--json");
        assertEquals(0, text.exitCode, text.err);
        JsonObject o = lastJsonLine(text.out);
        assertEquals("[1, 451, 340, 497]", Arrays.toString(ids(o.getAsJsonArray("prompt_ids")))); // BOS from add_bos_token
        CliRun byIds = CliRun.run("generate", "--model", dir, "--prompt-ids", "1,451,340,497", "--max-new-tokens", "8", "--json");
        JsonObject p = lastJsonLine(byIds.out);
        assertEquals(p.get("output_ids"), o.get("output_ids"));
        long[] out = ids(o.getAsJsonArray("output_ids"));
        assertEquals(CliRun.wordLevelText(out), o.get("text").getAsString());

        // plain mode streams the text
        CliRun plain = CliRun.run("generate", "--model", dir, "--prompt", "w451 w340 w497", "--max-new-tokens", "8");
        assertEquals(CliRun.wordLevelText(out), plain.out.strip());

        CliRun chat = CliRun.run("generate", "--model", dir, "--chat", "--prompt", "w7", "--max-new-tokens", "4", "--json");
        assertEquals(0, chat.exitCode, chat.err);
        // "<s>user w7 assistant" from the template
        assertEquals("[1, 3, 7, 4]", Arrays.toString(ids(lastJsonLine(chat.out).getAsJsonArray("prompt_ids"))));
    }

    @Test
    void errorsAreClear() {
        CliRun r = CliRun.run("generate", "--model", V3, "--prompt", "hello", "--max-new-tokens", "4");
        assertEquals(1, r.exitCode);
        assertTrue(r.err.contains("tokenizer.json") && r.err.contains("--prompt-ids"), r.err);

        r = CliRun.run("generate", "--model", V3, "--prompt-ids", "1,99999", "--max-new-tokens", "4");
        assertEquals(1, r.exitCode);
        assertTrue(r.err.contains("outside the vocabulary"), r.err);

        r = CliRun.run("generate", "--model", V3, "--prompt-ids", "1,2", "--max-new-tokens", "0");
        assertEquals(2, r.exitCode, "a bad option value is a usage error");
        assertTrue(r.err.startsWith("memopt generate: Invalid value for option '--max-new-tokens': must be at least 1,"
                + " got 0"), r.err);

        r = CliRun.run("generate", "--model", "/nonexistent/dir", "--prompt-ids", "1", "--max-new-tokens", "4");
        assertEquals(1, r.exitCode);
        assertTrue(r.err.contains("/nonexistent/dir"), r.err);

        r = CliRun.run("generate", "--model", V3, "--prompt-ids", "1", "--max-new-tokens", "4", "--device", "tpu");
        assertEquals(1, r.exitCode);
        assertTrue(r.err.contains("--device"), r.err);

        r = CliRun.run("generate", "--model", V3, "--max-new-tokens", "4"); // no prompt: picocli usage error
        assertEquals(2, r.exitCode);
    }

    @Test
    void newTokensBeyondTheContextAreRefusedBeforeAllocating() {
        // the fixture's context is 256 tokens; 1e9 new tokens once died with OutOfMemoryError
        CliRun r = CliRun.run("generate", "--model", V3, "--prompt-ids", "1,2", "--max-new-tokens", "1000000000");
        assertEquals(1, r.exitCode, r.err);
        assertTrue(r.err.contains("1000000002") && r.err.contains("256") && r.err.contains("max_position_embeddings"), r.err);
        assertTrue(!r.err.contains("OutOfMemoryError"), r.err);
    }
}
