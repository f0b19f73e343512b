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

    @Test
    void layersSplitOverStagesGiveTheSingleDeviceTokens() {
        for (String[] split : new String[][] {{"--devices", "cpu,cpu"}, {"--devices", "cpu,CPU,cpu"},
                {"--devices", "cpu,cpu", "--layer-split", "1,2"}, {"--devices", "cpu,cpu", "--layer-split", "0-1,2"}}) {
            String[] args = concat(new String[] {"generate", "--model", V3, "--prompt-ids", "451,340,497,361,133,474",
                "--max-new-tokens", "16", "--json"}, split);
            CliRun r = CliRun.run(args);
            assertEquals(0, r.exitCode, r.err);
            JsonObject o = lastJsonLine(r.out);
            assertEquals(Arrays.toString(GREEDY), Arrays.toString(ids(o.getAsJsonArray("output_ids"))),
                    Arrays.toString(split));
            JsonArray stages = o.getAsJsonArray("stages");
            assertEquals(split[1].split(",").length, stages.size(), o.toString());
            long cache = 0;
            for (int s = 0; s < stages.size(); s++) {
                cache += stages.get(s).getAsJsonObject().get("cache_bytes_per_token").getAsLong();
            }
            assertEquals(o.get("cache_bytes_per_token").getAsLong(), cache);
        }
        CliRun r = CliRun.run("generate", "--model", V3, "--prompt-ids", "451,340,497,361,133,474", "--max-new-tokens",
                "16", "--json", "--devices", "cpu,cpu", "--layer-split", "1,2");
        JsonArray stages = lastJsonLine(r.out).getAsJsonArray("stages");
        assertEquals("0-0", stages.get(0).getAsJsonObject().get("layers").getAsString());
        assertEquals("1-2", stages.get(1).getAsJsonObject().get("layers").getAsString());
        assertEquals("cpu()", stages.get(1).getAsJsonObject().get("device").getAsString());
    }

    @Test
    void anInt4ArtifactSplitGivesItsSingleDeviceTokens(@TempDir Path tmp) {
        String int4 = tmp.resolve("int4").toString();
        CliRun q = CliRun.run("quantize", "--model", V3, "--scheme", "int4", "--group-size", "32", "--out", int4);
        assertEquals(0, q.exitCode, q.err);
        String[] args = {"generate", "--model", int4, "--prompt-ids", "451,340,497,361,133,474", "--max-new-tokens", "12",
            "--ignore-eos", "--json"};
        CliRun single = CliRun.run(args);
        CliRun split = CliRun.run(concat(args, new String[] {"--devices", "cpu,cpu,cpu"}));
        assertEquals(0, split.exitCode, split.err);
        assertEquals(lastJsonLine(single.out).get("output_ids"), lastJsonLine(split.out).get("output_ids"));
    }

    @Test
    void badDeviceListsAndSplitsAreNamed() {
        String[] base = {"generate", "--model", V3, "--prompt-ids", "5,17", "--max-new-tokens", "2"};
        assertFails(concat(base, new String[] {"--devices", "cpu,tpu0"}), "--devices must be cpu, gpu, gpu:N or gpuN, got 'tpu0'");
        assertFails(concat(base, new String[] {"--devices", "cpu,gpu999"}), "--devices gpu999: the engine sees");
        assertFails(concat(base, new String[] {"--devices", "cpu,,cpu"}), "an empty device name");
        assertFails(concat(base, new String[] {"--devices", "cpu,cpu", "--layer-split", "2,2"}),
                "split '2,2' places 4 layers; the model has 3 decoder layers");
        assertFails(concat(base, new String[] {"--devices", "cpu,cpu", "--layer-split", "3"}),
                "has 1 entries for 2 devices");
        assertFails(concat(base, new String[] {"--devices", "cpu,cpu,cpu,cpu"}),
                "4 devices need at least as many decoder layers, the model has 3");
        assertFails(concat(base, new String[] {"--devices", "cpu,cpu", "--device", "cpu"}), "not both");
        assertFails(concat(base, new String[] {"--layer-split", "2,1"}), "--layer-split needs --devices");
    }

    private static void assertFails(String[] args, String message) {
        CliRun r = CliRun.run(args);
        assertEquals(1, r.exitCode, r.out);
        assertTrue(r.err.contains(message), r.err);
    }

    static String[] concat(String[] a, String[] b) {
        String[] out = Arrays.copyOf(a, a.length + b.length);
        System.arraycopy(b, 0, out, a.length, b.length);
        return out;
    }
}
