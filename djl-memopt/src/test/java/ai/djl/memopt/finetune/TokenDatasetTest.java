package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class TokenDatasetTest {

    @TempDir Path tmp;

    /** Word-level tokenizer: "[UNK]" 0, "<s>" 1 (special), word i of WORDS id 10 + i. */
    static final String[] WORDS = "alpha beta gamma delta epsilon zeta eta theta".split(" ");

    private Path tokenizer(boolean addBos) throws IOException {
        Path dir = tmp.resolve(addBos ? "bos" : "plain");
        Files.createDirectories(dir);
        StringBuilder vocab = new StringBuilder("\"[UNK]\": 0, \"<s>\": 1");
        for (int i = 0; i < WORDS.length; i++) {
            vocab.append(", \"").append(WORDS[i]).append("\": ").append(10 + i);
        }
        Files.writeString(dir.resolve("tokenizer.json"), "{\"version\": \"1.0\", \"truncation\": null, "
                + "\"padding\": null, \"added_tokens\": [{\"id\": 1, \"content\": \"<s>\", \"single_word\": false, "
                + "\"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true}], "
                + "\"normalizer\": null, \"pre_tokenizer\": {\"type\": \"Whitespace\"}, \"post_processor\": "
                + "{\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}},"
                + " {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], \"pair\": [{\"Sequence\": {\"id\": \"A\", "
                + "\"type_id\": 0}}], \"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [1], \"tokens\": "
                + "[\"<s>\"]}}}, \"decoder\": null, "
                + "\"model\": {\"type\": \"WordLevel\", \"vocab\": {" + vocab + "}, \"unk_token\": \"[UNK]\"}}");
        if (addBos) {
            Files.writeString(dir.resolve("tokenizer_config.json"),
                    "{\"add_bos_token\": true, \"bos_token\": {\"content\": \"<s>\", \"lstrip\": false}}");
        }
        return dir.resolve("tokenizer.json");
    }

    /** {@code n} words cycling through WORDS from {@code offset}. */
    private static String words(int n, int offset) {
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < n; i++) {
            sb.append(WORDS[(i + offset) % WORDS.length]).append(i % 17 == 16 ? "\n" : " ");
        }
        return sb.toString();
    }

    @Test
    void longDocumentsAreNotTruncatedAndGetOneBosEach() throws Exception {
        Path corpus = tmp.resolve("corpus");
        Files.createDirectories(corpus);
        Files.writeString(corpus.resolve("b.txt"), words(700, 3)); // longer than DJL's default 512-token truncation
        Files.writeString(corpus.resolve("a.txt"), words(300, 0));
        Files.writeString(corpus.resolve("ignored.md"), "alpha alpha");
        TextCorpus text = TextCorpus.read(corpus);
        assertEquals(List.of("a.txt", "b.txt"), text.names());
        TokenDataset plain = TokenDataset.tokenize(text, tokenizer(false), 100, 0, 1);
        assertEquals(1000, plain.tokenCount()); // no template BOS although the post-processor has one
        TokenDataset data = TokenDataset.tokenize(text, tokenizer(true), 100, 0.1, 1);
        assertEquals(1002, data.tokenCount());
        assertEquals(10, data.trainSequences() + data.heldOutSequences());
        assertEquals(1, data.heldOutSequences());
        // the stream: <s> a.txt <s> b.txt; sequence 0 is its first 100 tokens (in corpus order in the held-out split)
        List<Long> expected = new ArrayList<>();
        expected.add(1L);
        for (int i = 0; i < 300; i++) {
            expected.add(10L + i % WORDS.length);
        }
        expected.add(1L);
        for (int i = 0; i < 700; i++) {
            expected.add(10L + (i + 3) % WORDS.length);
        }
        long[] held = data.heldOutBatch(0, 1).row(0);
        for (int i = 0; i < 100; i++) {
            assertEquals(expected.get(900 + i), held[i], "held-out token " + i);
        }
        // an epoch visits every training sequence once, each equal to its slice of the stream
        Set<Integer> seen = new HashSet<>();
        TokenBatch epoch = data.trainBatch(0, data.trainSequences());
        for (int r = 0; r < epoch.rows(); r++) {
            long[] row = epoch.row(r);
            int start = -1;
            for (int s = 0; s < data.trainSequences(); s++) {
                boolean same = true;
                for (int i = 0; i < 100 && same; i++) {
                    same = row[i] == expected.get(s * 100 + i);
                }
                if (same && !seen.contains(s)) {
                    start = s;
                    break;
                }
            }
            assertTrue(start >= 0, "row " + r + " is a training sequence");
            seen.add(start);
        }
        assertEquals(data.trainSequences(), seen.size());
    }

    @Test
    void batchesAreDeterministicAndResumable() {
        int[] stream = new int[50 * 8];
        for (int i = 0; i < stream.length; i++) {
            stream[i] = i / 8; // sequence s is all s
        }
        TokenDataset a = TokenDataset.fromTokens(stream, 8, 0, 42);
        TokenDataset b = TokenDataset.fromTokens(stream, 8, 0, 42);
        TokenDataset c = TokenDataset.fromTokens(stream, 8, 0, 43);
        long[] firstRows = new long[120];
        for (int step = 0; step < 30; step++) {
            TokenBatch x = a.trainBatch(step * 4L, 4);
            for (int r = 0; r < 4; r++) {
                firstRows[step * 4 + r] = x.row(r)[0];
            }
        }
        // resuming at a position (even across an epoch boundary) gives the same rows
        assertArrayEquals(Arrays.copyOfRange(firstRows, 48, 56), firstColumn(b.trainBatch(48, 8)));
        assertFalse(Arrays.equals(Arrays.copyOfRange(firstRows, 0, 50), firstColumn(c.trainBatch(0, 50))));
        // each epoch is a permutation, and epochs differ
        long[] e0 = Arrays.copyOfRange(firstRows, 0, 50);
        long[] e1 = Arrays.copyOfRange(firstRows, 50, 100);
        assertFalse(Arrays.equals(e0, e1));
        Arrays.sort(e0);
        Arrays.sort(e1);
        for (int i = 0; i < 50; i++) {
            assertEquals(i, e0[i]);
            assertEquals(i, e1[i]);
        }
    }

    private static long[] firstColumn(TokenBatch batch) {
        long[] out = new long[batch.rows()];
        for (int r = 0; r < out.length; r++) {
            out[r] = batch.row(r)[0];
        }
        return out;
    }

    @Test
    void badInputIsNamed() throws Exception {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> TokenDataset.fromTokens(new int[10], 16, 0, 1));
        assertTrue(e.getMessage().contains("10 tokens"), e.getMessage());
        assertThrows(IllegalArgumentException.class, () -> TextCorpus.read(tmp.resolve("missing")));
        Files.createDirectories(tmp.resolve("empty"));
        e = assertThrows(IllegalArgumentException.class, () -> TextCorpus.read(tmp.resolve("empty")));
        assertTrue(e.getMessage().contains(".txt"), e.getMessage());
        Files.write(tmp.resolve("bad.txt"), new byte[] {'a', (byte) 0xC3, 'b'});
        IOException io = assertThrows(IOException.class, () -> TextCorpus.read(tmp.resolve("bad.txt")));
        assertTrue(io.getMessage().contains("UTF-8"), io.getMessage());
        Path dir = tmp.resolve("cfg");
        Files.createDirectories(dir);
        Files.copy(tokenizer(false), dir.resolve("tokenizer.json"));
        Files.writeString(dir.resolve("tokenizer_config.json"), "{\"add_bos_token\": true, \"bos_token\": \"<bos>\"}");
        e = assertThrows(IllegalArgumentException.class,
                () -> TokenDataset.tokenize(TextCorpus.of(List.of("alpha beta")), dir.resolve("tokenizer.json"), 2, 0,
                        1));
        assertTrue(e.getMessage().contains("<bos>"), e.getMessage());
    }
}
