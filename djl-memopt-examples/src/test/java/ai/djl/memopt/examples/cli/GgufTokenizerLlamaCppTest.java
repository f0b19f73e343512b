package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;

import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer;
import ai.djl.memopt.examples.demo.ByteLevelBpeTrainer;
import ai.djl.memopt.gguf.GgufExporter;
import ai.djl.memopt.gguf.GgufFile;
import ai.djl.memopt.gguf.GgufModelFiles;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * The tokenizer written to GGUF tokenizes in the real llama.cpp exactly as Hugging Face's tokenizers does: the
 * pre-tokenizer name ({@code deepseek-v3}, {@code gpt2}), the vocabulary and the merges are right.
 */
class GgufTokenizerLlamaCppTest {

    private static final String[] TEXTS = {
        "The state of the Union is strong.",
        "  Leading spaces,\ttabs\nand new\n\nlines; numbers 1234567 and 3.14159!",
        "Fellow-citizens: we observe today not a victory of party (1961), but a celebration of freedom.",
        "深度求索 DeepSeek-V3 混合专家模型 ❤ émigré naïve café",
        "don't won't I'll we've they're it's CAPS MiXeD"
    };

    @TempDir
    Path tmp;

    @Test
    void deepSeekV3AndDemoTokenizersTokenizeAsTransformers() throws Exception {
        Path v3Tokenizer = Path.of("..", "djl-memopt", "src", "test", "resources", "tokenizers", "deepseek-v3")
                .toAbsolutePath().normalize();
        DeepSeekConfig base = DeepSeekConfig.fromJson(CliRun.FIXTURES.resolve("tiny-deepseek-v3/config.json"));
        Path v3File = tmp.resolve("deepseek-v3-vocab.gguf");
        assertEquals("deepseek-v3", GgufExporter.exportVocabulary(base.toBuilder().vocabSize(129280).build(),
                v3Tokenizer, v3File, null));

        Path demoDir = Files.createDirectories(tmp.resolve("demo"));
        ByteLevelBpeTrainer bpe = ByteLevelBpeTrainer.train(List.of(String.join(" ", TEXTS).repeat(3)), 400);
        bpe.writeTo(demoDir);
        Path demoFile = tmp.resolve("demo-vocab.gguf");
        assertEquals("gpt-2", GgufExporter.exportVocabulary(base.toBuilder().vocabSize(bpe.vocabSize()).build(),
                demoDir, demoFile, null));

        JsonArray jobs = new JsonArray();
        for (Path f : new Path[] {v3File, demoFile}) {
            JsonObject job = LlamaCpp.job(f);
            job.addProperty("vocabOnly", true);
            JsonArray texts = new JsonArray();
            for (String t : TEXTS) {
                texts.add(t);
            }
            job.add("tokenize", texts);
            jobs.add(job);
        }
        JsonObject request = new JsonObject();
        request.add("jobs", jobs);
        JsonArray results = LlamaCpp.check(request);
        Path[] tokenizers = {v3Tokenizer.resolve("tokenizer.json"), demoDir.resolve("tokenizer.json")};
        Path[] files = {v3File, demoFile};
        for (int k = 0; k < 2; k++) {
            JsonArray tokens = results.get(k).getAsJsonObject().getAsJsonArray("tokens");
            // the tokenizer our import rebuilds from the GGUF file tokenizes the same way too
            Path rebuilt = GgufModelFiles.directoryOf(files[k]).resolve("tokenizer.json");
            try (HuggingFaceTokenizer hf = HuggingFaceTokenizer.newInstance(tokenizers[k], Map.of("addSpecialTokens",
                    "false"));
                    HuggingFaceTokenizer back = HuggingFaceTokenizer.newInstance(rebuilt, Map.of("addSpecialTokens",
                            "false"))) {
                for (int i = 0; i < TEXTS.length; i++) {
                    long[] expected = hf.encode(TEXTS[i]).getIds();
                    assertArrayEquals(expected, LlamaCpp.longs(tokens.get(i).getAsJsonArray()),
                            files[k].getFileName() + ": llama.cpp tokenizes '" + TEXTS[i] + "' differently");
                    assertArrayEquals(expected, back.encode(TEXTS[i]).getIds(), "rebuilt tokenizer");
                }
            }
            try (GgufFile f = GgufFile.open(files[k])) {
                assertEquals(0, f.tensors().size());
            }
        }
    }
}
