package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.StringJoiner;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class PerplexityCommandTest {

    private static final Path FIXTURE = Path.of("../djl-memopt/src/test/resources/fixtures/tiny-deepseek-v3");

    @TempDir Path tmp;

    /** Runs the CLI in-process, returning exit code, stdout and stderr. */
    private static String[] run(String... args) {
        return FinetuneCommandTest.run(args);
    }

    /** transformers' loss for row 0 of the fixture input, from its own logits. */
    private static double referenceRowLoss(long[] row) throws Exception {
        try (SafetensorsFile ref = SafetensorsFile.open(FIXTURE.resolve("reference.safetensors"))) {
            float[] logits = ref.readFloats("logits"); // (2, 12, 512)
            double nll = 0;
            for (int t = 0; t < 11; t++) {
                int base = t * 512;
                double max = Double.NEGATIVE_INFINITY;
                for (int v = 0; v < 512; v++) {
                    max = Math.max(max, logits[base + v]);
                }
                double sum = 0;
                for (int v = 0; v < 512; v++) {
                    sum += Math.exp(logits[base + v] - max);
                }
                nll += max + Math.log(sum) - logits[base + (int) row[t + 1]];
            }
            return nll / 11;
        }
    }

    private static long[] fixtureRow() throws Exception {
        try (SafetensorsFile ref = SafetensorsFile.open(FIXTURE.resolve("reference.safetensors"))) {
            long[] all = new long[24];
            java.nio.ByteBuffer b = ref.bytes("input_ids").order(java.nio.ByteOrder.LITTLE_ENDIAN);
            for (int i = 0; i < 24; i++) {
                all[i] = b.getLong(i * 8);
            }
            return Arrays.copyOf(all, 12);
        }
    }

    private static String csv(long[] ids) {
        StringJoiner j = new StringJoiner(",");
        for (long id : ids) {
            j.add(Long.toString(id));
        }
        return j.toString();
    }

    @Test
    void tokenIdsGiveTheTransformersLoss() throws Exception {
        long[] row = fixtureRow();
        String[] r = run("perplexity", "--model", FIXTURE.toString(), "--token-ids", csv(row), "--json");
        assertEquals("0", r[0], r[2]);
        String[] lines = r[1].trim().split("\n");
        assertEquals(1, lines.length, r[1]);
        JsonObject json = JsonParser.parseString(lines[0]).getAsJsonObject();
        double expected = referenceRowLoss(row);
        assertEquals(12, json.get("tokens").getAsInt());
        assertEquals(11, json.get("predicted").getAsInt());
        assertEquals(expected, json.get("loss").getAsDouble(), 1e-5 * expected);
        assertEquals(Math.exp(json.get("loss").getAsDouble()), json.get("perplexity").getAsDouble(), 1e-9);
        assertEquals("cpu", json.get("device").getAsString());
    }

    @Test
    void textIsTokenizedAndScoredInWindows() throws Exception {
        Path dir = tmp.resolve("model");
        Files.createDirectories(dir);
        for (String f : new String[] {"config.json", "model.safetensors"}) {
            Files.copy(FIXTURE.resolve(f), dir.resolve(f));
        }
        // a word-level tokenizer: word i of the list has id 10 + i
        String[] words = "the quick brown fox jumps over a lazy dog and then runs away".split(" ");
        StringBuilder vocab = new StringBuilder("\"[UNK]\": 0");
        for (int i = 0; i < words.length; i++) {
            vocab.append(", \"").append(words[i]).append("\": ").append(10 + i);
        }
        Files.writeString(dir.resolve("tokenizer.json"), "{\"version\": \"1.0\", \"truncation\": null, "
                + "\"padding\": null, \"added_tokens\": [], \"normalizer\": null, "
                + "\"pre_tokenizer\": {\"type\": \"Whitespace\"}, \"post_processor\": null, \"decoder\": null, "
                + "\"model\": {\"type\": \"WordLevel\", \"vocab\": {" + vocab + "}, \"unk_token\": \"[UNK]\"}}");
        Path text = tmp.resolve("text.txt");
        String sentence = "the quick brown fox jumps over a lazy dog and then runs away the fox runs";
        Files.writeString(text, sentence);
        String[] r = run("perplexity", "--model", dir.toString(), "--text", text.toString(), "--seq", "6");
        assertEquals("0", r[0], r[2]);
        JsonObject json = JsonParser.parseString(r[1].trim()).getAsJsonObject();
        String[] tokens = sentence.split(" ");
        long[] ids = new long[tokens.length];
        for (int i = 0; i < tokens.length; i++) {
            ids[i] = 10 + Arrays.asList(words).indexOf(tokens[i]);
        }
        assertEquals(ids.length, json.get("tokens").getAsInt());
        assertEquals(3, json.get("windows").getAsInt()); // 16 tokens: 6 + 6 + 4
        assertEquals(5 + 5 + 3, json.get("predicted").getAsInt());
        double nll = 0;
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, ai.djl.Device.cpu(), DataType.FLOAT32);
                NDManager m = lm.manager().newSubManager()) {
            for (int s = 0; s < ids.length; s += 6) {
                long[] w = Arrays.copyOfRange(ids, s, Math.min(ids.length, s + 6));
                NDArray in = m.create(w, new Shape(1, w.length));
                NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(in), false).head();
                nll += CausalLmLoss.sum(logits, in, null).nll();
            }
        }
        assertEquals(nll / 13, json.get("loss").getAsDouble(), 1e-6);
        // without windows the loss differs (more context), so the windowing really happened
        String[] whole = run("perplexity", "--model", dir.toString(), "--text", text.toString(), "--seq", "64");
        assertNotEquals(json.get("loss").getAsDouble(),
                JsonParser.parseString(whole[1].trim()).getAsJsonObject().get("loss").getAsDouble());
    }

    @Test
    void errorsAreClear() {
        String[] r = run("perplexity", "--model", tmp.resolve("missing").toString(), "--token-ids", "1,2,3");
        assertEquals("1", r[0]);
        assertTrue(r[2].contains("does not exist"), r[2]);
        r = run("perplexity", "--model", FIXTURE.toString(), "--token-ids", "1,x,3");
        assertEquals("1", r[0]);
        assertTrue(r[2].contains("'x'"), r[2]);
        r = run("perplexity", "--model", FIXTURE.toString(), "--token-ids", "1,600,3");
        assertEquals("1", r[0]);
        assertTrue(r[2].contains("600") && r[2].contains("[0, 512)"), r[2]);
        r = run("perplexity", "--model", FIXTURE.toString());
        assertEquals("1", r[0]);
        assertTrue(r[2].contains("--token-ids or --text"), r[2]);
        r = run("perplexity", "--model", FIXTURE.toString(), "--text", "nofile.txt");
        assertEquals("1", r[0]);
        assertTrue(r[2].contains("nofile.txt"), r[2]);
        r = run("perplexity", "--model", FIXTURE.toString(), "--token-ids", "1,2", "--device", "tpu");
        assertEquals("1", r[0]);
        assertTrue(r[2].contains("tpu"), r[2]);
        assertTrue(r[1].isEmpty(), r[1]);
    }

    @Test
    void windowsLongerThanTheContextAreRefused() {
        // the fixture's context is 256 tokens: positions past it were silently used
        String[] r = run("perplexity", "--model", FIXTURE.toString(), "--token-ids", "1,2,3", "--seq", "1000");
        assertEquals("1", r[0], r[2]);
        assertTrue(r[2].contains("--seq 1000") && r[2].contains("256") && r[2].contains("max_position_embeddings"), r[2]);
        assertTrue(r[1].isEmpty(), r[1]);
        r = run("perplexity", "--model", FIXTURE.toString(), "--token-ids", "1,2,3", "--seq", "256");
        assertEquals("0", r[0], r[2]);
    }

    @Test
    void textShowsItsProgressOnStderr() throws Exception {
        Path dir = CliRun.v3WithTokenizer(Files.createDirectories(tmp.resolve("m")));
        StringBuilder text = new StringBuilder();
        for (int i = 0; i < 40; i++) {
            text.append("w").append(10 + i).append(' ');
        }
        Path file = tmp.resolve("t.txt");
        Files.writeString(file, text.toString());
        String[] r = run("perplexity", "--model", dir.toString(), "--text", file.toString(), "--seq", "8");
        assertEquals("0", r[0], r[2]);
        JsonObject json = JsonParser.parseString(r[1].trim()).getAsJsonObject();
        int windows = json.get("windows").getAsInt();
        assertTrue(windows >= 5, r[1]);
        // a bar per window, ending at windows/windows; stdout keeps exactly the one JSON line
        assertTrue(r[2].contains(windows + "/" + windows), r[2]);
        assertTrue(r[2].contains("1/" + windows), r[2]);
        String[] quiet = run("perplexity", "--model", dir.toString(), "--text", file.toString(), "--seq", "8", "--no-progress");
        assertEquals("0", quiet[0], quiet[2]);
        assertTrue(quiet[2].isEmpty(), quiet[2]);
    }
}
