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
        try {
            return Path.of(TextTokenizerTest.class.getResource("/tokenizers/deepseek-v3/tokenizer.json").toURI()).getParent();
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
}
