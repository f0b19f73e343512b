package ai.djl.memopt.examples.demo;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.huggingface.tokenizers.Encoding;
import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class ByteLevelBpeTrainerTest {

    @TempDir Path tmp;

    static String corpus() throws IOException {
        try (InputStream in = ByteLevelBpeTrainerTest.class.getResourceAsStream(
                "/ai/djl/memopt/examples/demo/sotu/1961_john_f_kennedy_d.txt")) {
            return new String(in.readAllBytes(), StandardCharsets.UTF_8);
        }
    }

    @Test
    void huggingFaceTokenizerLoadsItAndRoundTripsText() throws IOException {
        String text = corpus();
        ByteLevelBpeTrainer bpe = ByteLevelBpeTrainer.train(List.of(text), 600);
        assertEquals(600, bpe.vocabSize());
        bpe.writeTo(tmp);
        try (HuggingFaceTokenizer tok = HuggingFaceTokenizer.newInstance(tmp.resolve("tokenizer.json"),
                Map.of("addSpecialTokens", "false"))) {
            String sample = "The Congress of the United States, in 1961 — naïve café & 12.5% growth.";
            Encoding enc = tok.encode(sample);
            assertEquals(sample, tok.decode(enc.getIds()), "byte-level BPE is lossless, even off-corpus");
            long[] corpusIds = tok.encode(text.substring(0, 5000)).getIds();
            // learned merges compress in-corpus text well below one token per byte
            assertTrue(corpusIds.length < 5000 / 2.5, "tokens for 5000 bytes: " + corpusIds.length);
            for (long id : corpusIds) {
                assertTrue(id >= 2 && id < 600, "id " + id);
            }
            assertArrayEquals(new long[] {bpe.bosId()}, tok.encode(ByteLevelBpeTrainer.BOS).getIds());
        }
        // deterministic: the same corpus gives the same vocabulary
        assertEquals(bpe.toJson(), ByteLevelBpeTrainer.train(List.of(text), 600).toJson());
    }
}
