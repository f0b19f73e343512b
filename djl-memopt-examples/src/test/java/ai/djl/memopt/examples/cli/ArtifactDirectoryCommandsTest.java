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

/** A quantized artifact works wherever a model directory does: {@code perplexity} and {@code generate}. */
class ArtifactDirectoryCommandsTest {

    @TempDir Path tmp;

    static JsonObject lastJson(CliRun r) {
        String[] lines = r.out.strip().split("\n");
        return JsonParser.parseString(lines[lines.length - 1]).getAsJsonObject();
    }

    @Test
    void perplexityAndGenerateAcceptAnArtifact() throws Exception {
        Path model = CliRun.v3WithTokenizer(Files.createDirectories(tmp.resolve("model")));
        Path int8 = tmp.resolve("int8");
        CliRun q = CliRun.run("quantize", "--model", model.toString(), "--scheme", "int8", "--out", int8.toString());
        assertEquals(0, q.exitCode, q.err);
        assertTrue(Files.isRegularFile(int8.resolve("tokenizer.json")), "the artifact carries the tokenizer");

        String ids = "451,340,497,361,133,474,12,99,250,7";
        CliRun fp32 = CliRun.run("perplexity", "--model", model.toString(), "--token-ids", ids);
        CliRun q8 = CliRun.run("perplexity", "--model", int8.toString(), "--token-ids", ids);
        assertEquals(0, fp32.exitCode, fp32.err);
        assertEquals(0, q8.exitCode, q8.err);
        double lossFp32 = lastJson(fp32).get("loss").getAsDouble();
        double lossInt8 = lastJson(q8).get("loss").getAsDouble();
        assertNotEquals(lossFp32, lossInt8, "the artifact's quantized weights are used");
        // int8 per-channel keeps logits within about 1% on this model (see the quantize tests): the loss follows
        assertEquals(lossFp32, lossInt8, 0.01 * lossFp32);

        CliRun gen = CliRun.run("generate", "--model", int8.toString(), "--prompt", "user w17 w99",
                "--max-new-tokens", "5", "--json");
        assertEquals(0, gen.exitCode, gen.err);
        assertEquals(5, lastJson(gen).getAsJsonArray("output_ids").size(), gen.out);

        Files.write(int8.resolve("model.safetensors"), new byte[] {1, 2, 3});
        CliRun broken = CliRun.run("perplexity", "--model", int8.toString(), "--token-ids", ids);
        assertNotEquals(0, broken.exitCode);
        assertTrue(broken.err.contains("model.safetensors"), broken.err);
    }

    @Test
    void aTokenizerNotListedInTheManifestIsRefused() throws Exception {
        Path int8 = tmp.resolve("int8");
        CliRun q = CliRun.run("quantize", "--model", CliRun.FIXTURES.resolve("tiny-deepseek-v3").toString(), "--scheme", "int8",
                "--out", int8.toString());
        assertEquals(0, q.exitCode, q.err);
        assertTrue(!Files.exists(int8.resolve("tokenizer.json")));
        // dropped in after the export: not covered by quantization.json's checksums
        for (String f : new String[] {"tokenizer.json", "tokenizer_config.json"}) {
            Files.copy(CliRun.WORDLEVEL_TOKENIZER.resolve(f), int8.resolve(f));
        }
        CliRun gen = CliRun.run("generate", "--model", int8.toString(), "--prompt", "w17 w99", "--max-new-tokens", "3");
        assertEquals(1, gen.exitCode, gen.out);
        assertTrue(gen.err.contains("tokenizer.json") && gen.err.contains("not listed") && gen.err.contains("quantization.json"), gen.err);
        Path text = tmp.resolve("t.txt");
        Files.writeString(text, "w17 w99 w3 w5");
        CliRun ppl = CliRun.run("perplexity", "--model", int8.toString(), "--text", text.toString());
        assertEquals(1, ppl.exitCode, ppl.out);
        assertTrue(ppl.err.contains("tokenizer.json") && ppl.err.contains("not listed"), ppl.err);
        // the artifact is refused as a whole, even where ids need no tokenizer, until the unlisted files are removed
        CliRun ids = CliRun.run("generate", "--model", int8.toString(), "--prompt-ids", "17,99", "--max-new-tokens", "3");
        assertEquals(1, ids.exitCode, ids.out);
        assertTrue(ids.err.contains("not listed"), ids.err);
        for (String f : new String[] {"tokenizer.json", "tokenizer_config.json"}) {
            Files.delete(int8.resolve(f));
        }
        CliRun clean = CliRun.run("generate", "--model", int8.toString(), "--prompt-ids", "17,99", "--max-new-tokens", "3");
        assertEquals(0, clean.exitCode, clean.err);
    }
}
