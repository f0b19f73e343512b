package ai.djl.memopt.inference;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.net.URISyntaxException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class TextTokenizerTest {

    static final String BOS = "<｜begin▁of▁sentence｜>";
    static final String EOS = "<｜end▁of▁sentence｜>";

    static TextTokenizer tok;

    static Path deepSeekTokenizerDir() {
        return tokenizerDir("deepseek-v3");
    }

    /** A tokenizer directory of the test resources: {@code deepseek-v3} or {@code wordlevel-512}. */
    static Path tokenizerDir(String name) {
        try {
            return Path.of(TextTokenizerTest.class.getResource("/tokenizers/" + name + "/tokenizer.json").toURI()).getParent();
        } catch (URISyntaxException e) {
            throw new IllegalStateException(e);
        }
    }

    @BeforeAll
    static void load() throws IOException {
        tok = TextTokenizer.fromModelDir(deepSeekTokenizerDir());
    }

    @AfterAll
    static void close() {
        tok.close();
    }

    @Test
    void encodesWithBosFromTokenizerConfig() {
        // tokenizer.json's post-processor adds nothing; add_bos_token=true in tokenizer_config.json adds id 0
        assertArrayEquals(new long[] {0, 19923, 2058, 3}, tok.encode("Hello world!"));
        assertArrayEquals(new long[] {19923, 2058, 3}, tok.encode("Hello world!", false));
        assertEquals(0L, tok.bosId().orElseThrow());
        assertEquals(BOS, tok.bosToken().orElseThrow());
    }

    @Test
    void decodeRoundTripsAndSkipsSpecialTokens() {
        String text = "The quick brown fox, 12345 ünïcödé and 中文.";
        long[] ids = tok.encode(text);
        assertEquals(text, tok.decode(ids, true));
        assertEquals(BOS + text, tok.decode(ids, false));
    }

    @Test
    void longTextIsNotTruncated() {
        // DJL's HuggingFaceTokenizer truncates at 512 tokens by default
        String text = "word ".repeat(2000);
        long[] ids = tok.encode(text, false);
        assertTrue(ids.length >= 2000, "got " + ids.length + " tokens");
        assertEquals(text, tok.decode(ids, true));
    }

    @Test
    void chatIsRenderedAndEncodedWithoutASecondBos() {
        long[] ids = tok.encodeChat(List.of(ChatMessage.user("Hello world!")), true);
        assertArrayEquals(new long[] {0, 128803, 19923, 2058, 3, 128804}, ids);
    }

    @Test
    void eosIdsComeFromGenerationConfigThenConfig(@TempDir Path dir) throws IOException {
        Path src = deepSeekTokenizerDir();
        Files.copy(src.resolve("tokenizer.json"), dir.resolve("tokenizer.json"));
        Files.copy(src.resolve("tokenizer_config.json"), dir.resolve("tokenizer_config.json"));
        try (TextTokenizer t = TextTokenizer.fromModelDir(dir)) {
            assertEquals(List.of(1L), t.eosIds()); // from eos_token in tokenizer_config.json
        }
        Files.writeString(dir.resolve("config.json"), "{\"eos_token_id\": 7}");
        try (TextTokenizer t = TextTokenizer.fromModelDir(dir)) {
            assertEquals(List.of(7L), t.eosIds());
        }
        Files.writeString(dir.resolve("generation_config.json"), "{\"eos_token_id\": [1, 5]}");
        try (TextTokenizer t = TextTokenizer.fromModelDir(dir)) {
            assertEquals(List.of(1L, 5L), t.eosIds());
        }
        Files.writeString(dir.resolve("generation_config.json"), "{\"eos_token_id\": \"x\"");
        IOException e = assertThrows(IOException.class, () -> TextTokenizer.fromModelDir(dir));
        assertTrue(e.getMessage().contains("generation_config.json"), e.getMessage());
    }

    @Test
    void chatTemplateFromASeparateJinjaFile(@TempDir Path dir) throws IOException {
        Path src = deepSeekTokenizerDir();
        Files.copy(src.resolve("tokenizer.json"), dir.resolve("tokenizer.json"));
        Files.writeString(dir.resolve("tokenizer_config.json"), "{\"add_bos_token\": true, \"bos_token\": \"" + BOS + "\"}");
        try (TextTokenizer t = TextTokenizer.fromModelDir(dir)) {
            assertTrue(t.chatTemplate().isEmpty());
        }
        Files.writeString(dir.resolve("chat_template.jinja"), "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}\n");
        try (TextTokenizer t = TextTokenizer.fromModelDir(dir)) {
            assertEquals(BOS + "[Hi]", t.applyChatTemplate(List.of(ChatMessage.user("Hi")), true));
        }
    }

    @Test
    void missingTokenizerJsonIsAClearError(@TempDir Path dir) {
        IOException e = assertThrows(IOException.class, () -> TextTokenizer.fromModelDir(dir));
        assertTrue(e.getMessage().contains("tokenizer.json"), e.getMessage());
    }

    @Test
    void byteLevelBpeTokensCoverAtMost128BytesOfDeepSeekText() throws IOException {
        // the longest vocabulary entries are runs of 128 spaces / dots (counted in Python over tokenizer.json)
        assertEquals(128, tok.maxBytesPerToken().getAsInt());
        // the bound holds on the texts most likely to break it: long runs, the special tokens, multi-byte text
        String[] texts = {
            " ".repeat(1000), ".".repeat(777), "-".repeat(500), "\n".repeat(300), "\t".repeat(257),
            (BOS + EOS).repeat(40), "中文字符".repeat(100), "ünïcödé ".repeat(50), "\ud83d\ude00".repeat(120),
            "0123456789".repeat(40), "a".repeat(2000), "The quick brown fox. ".repeat(30)
        };
        for (String text : texts) {
            long bytes = TextTokenizer.utf8Length(text);
            long[] ids = tok.encode(text, false);
            assertTrue(ids.length >= tok.fewestTokens(bytes), text.substring(0, 8) + ": " + ids.length + " tokens for " + bytes + " bytes");
            assertTrue(ids.length <= TextTokenizer.mostTokens(bytes), text.substring(0, 8));
        }
        try (TextTokenizer words = FakeLms.wordLevelTokenizer()) {
            assertTrue(words.maxBytesPerToken().isEmpty(), "a word-level tokenizer has no bound per token");
            assertEquals(0, words.fewestTokens(1_000_000));
        }
    }

    @Test
    void aTextCertainlyTooLongIsRefusedWithoutTokenizing() {
        ContextLengthException e = assertThrows(ContextLengthException.class, () -> tok.encode("x".repeat(1000), true, 7));
        assertEquals(8, e.tokens()); // ceil(1000 / 128): the fewest tokens 1,000 bytes can be
        assertEquals(7, e.limit());
        assertTrue(e.getMessage().contains("without tokenizing"), e.getMessage());
        // within the bound the text is tokenized and counted: " a" is one token
        e = assertThrows(ContextLengthException.class, () -> tok.encode(" a".repeat(10), true, 7));
        assertEquals(11, e.tokens()); // BOS + 10
        assertTrue(!e.getMessage().contains("without tokenizing"), e.getMessage());
        assertEquals(11, tok.encode(" a".repeat(10), true, 11).length);
        IllegalArgumentException bad = assertThrows(IllegalArgumentException.class, () -> tok.encode("ab\ud800", true, 100));
        assertTrue(bad.getMessage().contains("unpaired") && bad.getMessage().contains("character 2"), bad.getMessage());
    }

    @Test
    void aRequestLeavesRoomForItsNewTokens() {
        GenerationRequest r = GenerationRequest.builder().optText("x".repeat(200)).setParams(SamplingParams.greedy(100)).build();
        ContextLengthException e = assertThrows(ContextLengthException.class, () -> r.promptIds(tok, 101));
        assertTrue(e.getMessage().contains("max_position_embeddings") && e.getMessage().contains("without tokenizing"), e.getMessage());
        assertEquals(102, e.tokens()); // 2 prompt tokens at least + 100
        GenerationRequest ids = GenerationRequest.builder().optPromptIds(new long[] {1, 2}).setParams(SamplingParams.greedy(100)).build();
        e = assertThrows(ContextLengthException.class, () -> ids.promptIds(tok, 101));
        assertTrue(e.getMessage().contains("= 102 tokens"), e.getMessage());
        assertArrayEquals(new long[] {1, 2}, ids.promptIds(tok, 102));
        e = assertThrows(ContextLengthException.class, () -> r.promptIds(tok, 100));
        assertTrue(e.getMessage().contains("no room"), e.getMessage());
    }

    @Test
    void onlyTheFilesGivenAreRead(@TempDir Path dir) throws IOException {
        Files.copy(deepSeekTokenizerDir().resolve("tokenizer.json"), dir.resolve("tokenizer.json"));
        Files.copy(deepSeekTokenizerDir().resolve("tokenizer_config.json"), dir.resolve("tokenizer_config.json"));
        Files.writeString(dir.resolve("generation_config.json"), "{\"eos_token_id\": 7}");
        Files.writeString(dir.resolve("config.json"), "{\"eos_token_id\": 9}");
        try (TextTokenizer all = TextTokenizer.fromFiles(ModelFiles.all(dir))) {
            assertEquals(List.of(7L), all.eosIds());
            assertEquals(0L, all.bosId().orElseThrow());
        }
        // generation_config.json and tokenizer_config.json not listed: not read
        try (TextTokenizer listed = TextTokenizer.fromFiles(ModelFiles.listed(dir, java.util.Set.of("tokenizer.json", "config.json"), "manifest.json"))) {
            assertEquals(List.of(9L), listed.eosIds());
            assertTrue(listed.bosId().isEmpty());
            assertTrue(listed.chatTemplate().isEmpty());
        }
        ModelFiles none = ModelFiles.listed(dir, java.util.Set.of("config.json"), "manifest.json");
        IOException e = assertThrows(IOException.class, () -> TextTokenizer.fromFiles(none));
        assertTrue(e.getMessage().contains("tokenizer.json is not listed in " + dir.resolve("manifest.json")), e.getMessage());
        assertTrue(ModelFiles.all(dir).absence("vocab.txt").contains("no vocab.txt in " + dir));
    }
}
