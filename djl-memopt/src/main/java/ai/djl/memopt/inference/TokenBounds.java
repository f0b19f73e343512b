package ai.djl.memopt.inference;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import com.google.gson.stream.JsonReader;
import com.google.gson.stream.JsonToken;
import java.io.IOException;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.util.OptionalInt;
import java.util.Set;
import java.util.function.Predicate;

/**
 * The most input bytes one token of a {@code tokenizer.json} can cover, when it has such a bound: then a text of
 * {@code n} UTF-8 bytes gives at least {@code ceil(n / bound)} tokens, and a text longer than {@code maxTokens x bound}
 * bytes can be refused without tokenizing it.
 *
 * <p><b>Byte-level BPE</b> (GPT-2, DeepSeek, Llama 3): every input byte belongs to exactly one token (there is no unknown
 * token: all 256 bytes are in the vocabulary) and a token covers the bytes its vocabulary entry spells, one character
 * of the byte-to-unicode alphabet per byte. The bound is the longest entry in characters, or the longest added
 * (special) token in UTF-8 bytes, which is matched on the raw text: 128 for DeepSeek-V3 (a run of 128 spaces or dots).
 *
 * <p><b>Other BPE</b> (SentencePiece-style, with {@code byte_fallback} or a per-character unknown token): a vocabulary
 * entry's UTF-8 length bounds the input it covers (a {@code ▁} that stands for a space is longer than the space; a
 * {@code <0x41>} fallback byte is longer than its byte), an unfused unknown token covers one character (4 bytes).
 *
 * <p><b>No bound</b> when one token can cover arbitrarily much text: WordLevel, WordPiece and Unigram models (a whole
 * unknown word is one token), a fused unknown token, a normalizer that may shorten the text ({@code NFKC} maps one
 * character to up to 18, but {@code Lowercase} maps the 3-byte Kelvin sign to {@code k}), or a pre-tokenizer that drops
 * input ({@code Whitespace}, {@code Split} with {@code Removed}). Only normalizers known never to shorten the text
 * ({@code Prepend}, {@code Replace} by something at least as long) and pre-tokenizers known to keep every byte are
 * accepted; anything unknown means no bound.
 */
final class TokenBounds {

    /** Pre-tokenizers that keep every input byte in some piece. */
    private static final Set<String> KEEPING_PRE_TOKENIZERS =
            Set.of("ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation");

    private TokenBounds() {}

    /**
     * The bound for a {@code tokenizer.json}, or empty when one token can cover unbounded input. Streams the file: the
     * vocabulary is measured entry by entry and the merges are skipped, so no tree of either is built (for DeepSeek-V3's
     * 7.8 MB file a Gson tree took as long as loading the tokenizer itself).
     *
     * @throws IOException if the JSON is malformed
     */
    static OptionalInt maxBytesPerToken(Reader tokenizerJson) throws IOException {
        JsonObject shallow = new JsonObject(); // the file without model.vocab and model.merges
        int longestChars = 0;
        int longestBytes = 0;
        try (JsonReader r = new JsonReader(tokenizerJson)) {
            r.beginObject();
            while (r.hasNext()) {
                String name = r.nextName();
                if (!"model".equals(name) || r.peek() != JsonToken.BEGIN_OBJECT) {
                    shallow.add(name, JsonParser.parseReader(r));
                    continue;
                }
                JsonObject model = new JsonObject();
                r.beginObject();
                while (r.hasNext()) {
                    String key = r.nextName();
                    if ("vocab".equals(key) && r.peek() == JsonToken.BEGIN_OBJECT) {
                        r.beginObject();
                        while (r.hasNext()) {
                            String entry = r.nextName();
                            r.skipValue();
                            longestChars = Math.max(longestChars, entry.codePointCount(0, entry.length()));
                            longestBytes = Math.max(longestBytes, utf8(entry));
                        }
                        r.endObject();
                        model.add("vocab", new JsonObject());
                    } else if ("merges".equals(key)) {
                        r.skipValue();
                    } else {
                        model.add(key, JsonParser.parseReader(r));
                    }
                }
                r.endObject();
                shallow.add("model", model);
            }
            r.endObject();
        } catch (JsonParseException | IllegalStateException e) {
            throw new IOException("malformed tokenizer JSON: " + e.getMessage(), e);
        }
        return maxBytesPerToken(shallow, longestChars, longestBytes);
    }

    /**
     * The bound from the file's settings and its vocabulary's longest entry.
     *
     * @param longestChars the longest vocabulary entry in code points
     * @param longestBytes the longest vocabulary entry in UTF-8 bytes
     */
    private static OptionalInt maxBytesPerToken(JsonObject tokenizer, int longestChars, int longestBytes) {
        JsonObject model = object(tokenizer.get("model"));
        if (model == null || !"BPE".equals(string(model.get("type"))) || object(model.get("vocab")) == null) {
            return OptionalInt.empty();
        }
        if (!lengthPreserving(tokenizer.get("normalizer")) || !keepsEveryByte(tokenizer.get("pre_tokenizer"))) {
            return OptionalInt.empty();
        }
        boolean byteLevel = mentions(tokenizer.get("pre_tokenizer"), "ByteLevel");
        String unk = string(model.get("unk_token"));
        if (unk != null && !bool(model.get("byte_fallback")) && bool(model.get("fuse_unk"))) {
            return OptionalInt.empty(); // a run of unknown characters fuses into one token
        }
        int bound = Math.max(unk != null ? 4 : 1, byteLevel ? longestChars : longestBytes);
        JsonElement added = tokenizer.get("added_tokens");
        if (added != null && added.isJsonArray()) {
            for (JsonElement t : (JsonArray) added) {
                JsonObject o = object(t);
                String content = o == null ? null : string(o.get("content"));
                if (content != null) {
                    bound = Math.max(bound, utf8(content));
                }
            }
        }
        return OptionalInt.of(bound);
    }

    private static boolean lengthPreserving(JsonElement normalizer) {
        JsonObject n = object(normalizer);
        if (n == null) {
            return normalizer == null || normalizer.isJsonNull();
        }
        String type = string(n.get("type"));
        if ("Sequence".equals(type)) {
            return allOf(n.get("normalizers"), TokenBounds::lengthPreserving);
        }
        if ("Replace".equals(type)) {
            JsonObject pattern = object(n.get("pattern"));
            String from = pattern == null ? null : string(pattern.get("String"));
            String to = string(n.get("content"));
            return from != null && to != null && utf8(to) >= utf8(from);
        }
        return "Prepend".equals(type);
    }

    private static boolean keepsEveryByte(JsonElement preTokenizer) {
        JsonObject p = object(preTokenizer);
        if (p == null) {
            return preTokenizer == null || preTokenizer.isJsonNull();
        }
        String type = string(p.get("type"));
        if ("Sequence".equals(type)) {
            return allOf(p.get("pretokenizers"), TokenBounds::keepsEveryByte);
        }
        if (("Split".equals(type) || "Punctuation".equals(type)) && "Removed".equals(string(p.get("behavior")))) {
            return false;
        }
        return KEEPING_PRE_TOKENIZERS.contains(type);
    }

    /** Whether {@code parts} is an array whose every element passes. */
    private static boolean allOf(JsonElement parts, Predicate<JsonElement> test) {
        if (parts == null || !parts.isJsonArray()) {
            return false;
        }
        for (JsonElement e : (JsonArray) parts) {
            if (!test.test(e)) {
                return false;
            }
        }
        return true;
    }

    private static boolean mentions(JsonElement e, String type) {
        JsonObject o = object(e);
        if (o == null) {
            return false;
        }
        if (type.equals(string(o.get("type")))) {
            return true;
        }
        JsonElement parts = o.get("pretokenizers");
        if (parts != null && parts.isJsonArray()) {
            for (JsonElement p : (JsonArray) parts) {
                if (mentions(p, type)) {
                    return true;
                }
            }
        }
        return false;
    }

    private static JsonObject object(JsonElement e) {
        return e != null && e.isJsonObject() ? e.getAsJsonObject() : null;
    }

    private static String string(JsonElement e) {
        return e != null && e.isJsonPrimitive() && e.getAsJsonPrimitive().isString() ? e.getAsString() : null;
    }

    private static boolean bool(JsonElement e) {
        return e != null && e.isJsonPrimitive() && e.getAsJsonPrimitive().isBoolean() && e.getAsBoolean();
    }

    private static int utf8(String s) {
        return s.getBytes(StandardCharsets.UTF_8).length;
    }
}
