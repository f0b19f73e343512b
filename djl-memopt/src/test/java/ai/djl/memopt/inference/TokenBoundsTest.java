package ai.djl.memopt.inference;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.io.StringReader;
import java.io.UncheckedIOException;
import java.util.OptionalInt;
import org.junit.jupiter.api.Test;

/** Which tokenizer.json shapes bound the bytes per token, and by how much (hand-written tokenizers). */
class TokenBoundsTest {

    static OptionalInt bound(String normalizer, String preTokenizer, String model, String added) {
        String json = "{\"normalizer\": " + normalizer + ", \"pre_tokenizer\": " + preTokenizer + ", \"model\": " + model
                + ", \"added_tokens\": " + added + "}";
        try {
            return TokenBounds.maxBytesPerToken(new StringReader(json));
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    static final String BYTE_LEVEL = "{\"type\": \"ByteLevel\", \"add_prefix_space\": false}";
    // "ĠĠĠ" is three spaces in the byte-to-unicode alphabet (3 bytes); "é" as bytes is "Ã©" (2 characters)
    static final String BPE = "{\"type\": \"BPE\", \"unk_token\": null, \"vocab\": {\"a\": 0, \"\u0120\u0120\u0120\": 1, \"\u00c3\u00a9\": 2},"
            + " \"merges\": [\"\u0120 \u0120\", [\"\u00c3\", \"\u00a9\"]]}";

    @Test
    void byteLevelCountsCharactersOfTheByteAlphabet() {
        assertEquals(3, bound("null", BYTE_LEVEL, BPE, "[]").getAsInt());
        assertEquals(3, bound("{\"type\": \"Sequence\", \"normalizers\": []}", "{\"type\": \"Sequence\", \"pretokenizers\": ["
                + "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\s+\"}, \"behavior\": \"Isolated\"}, " + BYTE_LEVEL + "]}", BPE, "[]")
                .getAsInt());
        // an added token is matched on the raw text: its UTF-8 length counts
        // < 1 + ｜ 3 + begin 5 + ▁ 3 + of 2 + ▁ 3 + sentence 8 + ｜ 3 + > 1 = 29 bytes
        assertEquals(29, bound("null", BYTE_LEVEL, BPE, "[{\"content\": \"<\uff5cbegin\u2581of\u2581sentence\uff5c>\"}]").getAsInt());
    }

    @Test
    void otherBpeCountsUtf8BytesAndUnknownCharacters() {
        String metaspace = "{\"type\": \"Metaspace\", \"replacement\": \"\u2581\"}";
        String bpe = "{\"type\": \"BPE\", \"unk_token\": null, \"byte_fallback\": true, \"vocab\": {\"\u2581the\": 0, \"<0x41>\": 1}}";
        assertEquals(6, bound("null", metaspace, bpe, "[]").getAsInt()); // "<0x41>"; "▁the" is 6 bytes too
        String unk = "{\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"fuse_unk\": false, \"vocab\": {\"ab\": 0}}";
        assertEquals(4, bound("null", "null", unk, "[]").getAsInt()); // an unknown character is one token of up to 4 bytes
        String replace = "{\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, \"content\": \"\u2581\"}";
        assertEquals(6, bound(replace, metaspace, bpe, "[]").getAsInt()); // " " -> "▁" only lengthens the text
    }

    @Test
    void noBoundWhenATokenCanCoverUnboundedText() {
        String fused = "{\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"fuse_unk\": true, \"vocab\": {\"ab\": 0}}";
        assertTrue(bound("null", "null", fused, "[]").isEmpty(), "fused unknown runs");
        assertTrue(bound("null", "null", "{\"type\": \"WordLevel\", \"vocab\": {\"a\": 0}, \"unk_token\": \"[UNK]\"}", "[]").isEmpty());
        assertTrue(bound("null", "null", "{\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}", "[]").isEmpty());
        assertTrue(bound("{\"type\": \"NFKC\"}", BYTE_LEVEL, BPE, "[]").isEmpty(), "NFKC can shorten (and lengthen) text");
        assertTrue(bound("{\"type\": \"Lowercase\"}", BYTE_LEVEL, BPE, "[]").isEmpty(), "the Kelvin sign lowercases to k");
        assertTrue(bound("{\"type\": \"Replace\", \"pattern\": {\"String\": \"  \"}, \"content\": \" \"}", BYTE_LEVEL, BPE, "[]").isEmpty());
        assertTrue(bound("null", "{\"type\": \"Whitespace\"}", BPE, "[]").isEmpty(), "whitespace is dropped");
        assertTrue(bound("null", "{\"type\": \"Split\", \"pattern\": {\"String\": \" \"}, \"behavior\": \"Removed\"}", BPE, "[]").isEmpty());
        assertTrue(bound("null", "{\"type\": \"SomethingNew\"}", BPE, "[]").isEmpty(), "unknown: no bound");
    }
}
