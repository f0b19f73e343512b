package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.ChatMessage;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.memopt.inference.TextTokenizer;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;

/**
 * A validated OpenAI completion or chat-completion request, not yet tokenized: the prompt as token ids or as the text to
 * tokenize (a chat already rendered with the model's template), {@code max_tokens} as given, the sampling params, the
 * streaming flag. {@link #params(int)} completes the params once the prompt's length is known.
 *
 * <p>The body must be UTF-8 (400 naming the byte offset of the first malformed sequence) and the prompt Unicode text
 * (400 for an unpaired surrogate written as a JSON escape).
 */
final class OpenAiRequest {

    private static final Set<String> ROLES = Set.of("system", "user", "assistant", "tool");
    private static final int MAX_STOPS = 4;

    final boolean chat;
    /** The prompt's ids when the request gave ids; null for text. */
    final long[] promptIds;
    /** The text to tokenize (a completion's prompt, or the rendered chat); null for ids. */
    final String promptText;
    /** {@code max_tokens} (or {@code max_completion_tokens}) as given, in range; null for the default. */
    final Integer maxTokens;
    final boolean stream;
    final String model;
    private final SamplingParams.Builder params;
    private final Limits limits;

    private OpenAiRequest(boolean chat, long[] promptIds, String promptText, Integer maxTokens, SamplingParams.Builder params,
            boolean stream, String model, Limits limits) {
        this.chat = chat;
        this.promptIds = promptIds;
        this.promptText = promptText;
        this.maxTokens = maxTokens;
        this.params = params;
        this.stream = stream;
        this.model = model;
        this.limits = limits;
    }

    /** Limits the server applies to every request. */
    record Limits(int maxTokens, int defaultCompletionTokens, int maxContextLength, int vocabSize) {}

    int contextLength() {
        return limits.maxContextLength();
    }

    /** The field a prompt problem is reported under. */
    String promptParam() {
        return chat ? "messages" : "prompt";
    }

    /** Whether tokenizing adds the tokenizer's special tokens (a chat template writes its own). */
    boolean addSpecialTokens() {
        return !chat;
    }

    /** The most prompt tokens the context leaves: room for {@code max_tokens}, or for one new token. */
    int maxPromptTokens() {
        return limits.maxContextLength() - (maxTokens != null ? maxTokens : 1);
    }

    /** New tokens at most for a prompt of {@code promptTokens}: {@code max_tokens}, or the default cut to the context. */
    int maxNewTokens(int promptTokens) {
        if (maxTokens != null) {
            return maxTokens;
        }
        int max = chat ? limits.maxTokens() : limits.defaultCompletionTokens();
        return Math.max(1, Math.min(max, limits.maxContextLength() - promptTokens));
    }

    /**
     * The sampling params for a prompt of {@code promptTokens}.
     *
     * @throws ApiException 400 ({@code context_length_exceeded}) if the prompt and the new tokens do not fit the context
     */
    SamplingParams params(int promptTokens) {
        int max = maxNewTokens(promptTokens);
        if ((long) promptTokens + max > limits.maxContextLength()) {
            throw ApiException.contextLength(maxTokens != null ? "max_tokens" : promptParam(),
                    maxTokens != null
                            ? "prompt (" + promptTokens + " tokens) + max_tokens (" + max + ") exceeds the context of "
                                    + limits.maxContextLength() + " tokens"
                            : "the prompt (" + promptTokens + " tokens) fills the context of " + limits.maxContextLength() + " tokens");
        }
        return params.setMaxNewTokens(max).build();
    }

    static OpenAiRequest parse(byte[] body, boolean chat, TextTokenizer tokenizer, Limits limits) {
        JsonObject o;
        try {
            JsonElement e = JsonParser.parseString(Utf8Text.decode(body, "the request body"));
            if (!e.isJsonObject()) {
                throw ApiException.badRequest(null, "the request body must be a JSON object");
            }
            o = e.getAsJsonObject();
        } catch (JsonParseException | IllegalStateException e) {
            throw ApiException.badRequest(null, "malformed JSON: " + e.getMessage());
        }
        String model = optString(o, "model");
        long[] ids = null;
        String text = null;
        if (chat) {
            text = chatPrompt(o, tokenizer);
        } else {
            JsonElement p = o.get("prompt");
            text = promptString(p);
            if (text == null) {
                ids = promptIds(p, limits);
            } else if (tokenizer == null) {
                throw ApiException.badRequest("prompt", "this server has no tokenizer: send the prompt as token ids");
            }
        }
        if (text != null) {
            Utf8Text.checkUnicode(text, chat ? "messages" : "prompt");
            if (text.isEmpty()) {
                throw ApiException.badRequest(chat ? "messages" : "prompt", "the prompt is empty");
            }
        }
        Integer n = optInt(o, "n");
        if (n != null && n != 1) {
            throw ApiException.badRequest("n", "only n = 1 is supported, got " + n);
        }
        JsonElement logprobs = o.get("logprobs");
        if (logprobs != null && !logprobs.isJsonNull()
                && !(logprobs.isJsonPrimitive() && (logprobs.getAsJsonPrimitive().isBoolean() ? !logprobs.getAsBoolean()
                        : logprobs.getAsJsonPrimitive().isNumber() && logprobs.getAsDouble() == 0))) {
            throw ApiException.badRequest("logprobs", "logprobs are not supported");
        }
        if (!chat && o.has("echo") && bool(o, "echo")) {
            throw ApiException.badRequest("echo", "echo is not supported");
        }
        Integer maxTokens = optInt(o, chat && o.has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens");
        if (maxTokens != null && (maxTokens < 1 || maxTokens > limits.maxTokens())) {
            throw ApiException.badRequest("max_tokens", "max_tokens must be in [1, " + limits.maxTokens() + "], got " + maxTokens);
        }
        SamplingParams.Builder p = SamplingParams.builder();
        Double temperature = optNumber(o, "temperature");
        float t = temperature == null ? 1f : temperature.floatValue();
        if (!(t >= 0 && t <= 2)) {
            throw ApiException.badRequest("temperature", "temperature must be in [0, 2], got " + temperature);
        }
        p.optTemperature(t);
        Double topP = optNumber(o, "top_p");
        if (topP != null) {
            if (!(topP > 0 && topP <= 1)) {
                throw ApiException.badRequest("top_p", "top_p must be in (0, 1], got " + topP);
            }
            p.optTopP(topP.floatValue());
        }
        Integer topK = optInt(o, "top_k");
        if (topK != null) {
            if (topK < 0) {
                throw ApiException.badRequest("top_k", "top_k must be >= 0 (0 = off), got " + topK);
            }
            p.optTopK(topK);
        }
        if (o.has("seed") && !o.get("seed").isJsonNull()) {
            p.optSeed(longValue(o, "seed"));
        }
        List<String> stops = stops(o);
        if (!stops.isEmpty()) {
            if (tokenizer == null) {
                throw ApiException.badRequest("stop", "stop strings need a tokenizer; this server has none");
            }
            p.optStopStrings(stops);
        }
        boolean stream = o.has("stream") && !o.get("stream").isJsonNull() && bool(o, "stream");
        OpenAiRequest req = new OpenAiRequest(chat, ids, text, maxTokens, p, stream, model, limits);
        if (ids != null) {
            req.params(ids.length); // an id prompt's context check needs no tokenizer
        }
        return req;
    }

    /** A completion prompt given as text (a string, or an array of one string); null if it is not text. */
    private static String promptString(JsonElement e) {
        if (e == null || e.isJsonNull()) {
            throw ApiException.badRequest("prompt", "prompt is required");
        }
        if (e.isJsonPrimitive() && e.getAsJsonPrimitive().isString()) {
            return e.getAsString();
        }
        if (e.isJsonArray()) {
            JsonArray a = e.getAsJsonArray();
            if (a.size() == 1 && a.get(0).isJsonPrimitive() && a.get(0).getAsJsonPrimitive().isString()) {
                return a.get(0).getAsString();
            }
            return null;
        }
        throw ApiException.badRequest("prompt", "prompt must be a string or an array of token ids");
    }

    private static long[] promptIds(JsonElement e, Limits limits) {
        JsonArray a = e.getAsJsonArray();
        if (a.isEmpty()) {
            throw ApiException.badRequest("prompt", "the prompt is empty");
        }
        long[] ids = new long[a.size()];
        for (int i = 0; i < ids.length; i++) {
            JsonElement x = a.get(i);
            if (!x.isJsonPrimitive() || !x.getAsJsonPrimitive().isNumber()) {
                throw ApiException.badRequest("prompt", "prompt must be a string, or an array of token ids (one prompt per request)");
            }
            ids[i] = exactLong(x.getAsJsonPrimitive(), "prompt");
            if (ids[i] < 0 || ids[i] >= limits.vocabSize()) {
                throw ApiException.badRequest("prompt", "token id " + ids[i] + " is outside the vocabulary [0, " + limits.vocabSize() + ")");
            }
        }
        return ids;
    }

    /** The chat rendered with the model's template, to be tokenized without added special tokens. */
    private static String chatPrompt(JsonObject o, TextTokenizer tokenizer) {
        JsonElement e = o.get("messages");
        if (e == null || !e.isJsonArray() || e.getAsJsonArray().isEmpty()) {
            throw ApiException.badRequest("messages", "messages must be a non-empty array");
        }
        List<ChatMessage> messages = new ArrayList<>();
        for (JsonElement m : e.getAsJsonArray()) {
            if (!m.isJsonObject()) {
                throw ApiException.badRequest("messages", "each message must be an object with role and content");
            }
            JsonObject mo = m.getAsJsonObject();
            String role = optString(mo, "role");
            if (role == null || !ROLES.contains(role)) {
                throw ApiException.badRequest("messages", "message role must be one of " + ROLES + ", got " + role);
            }
            String content = content(mo.get("content"));
            Utf8Text.checkUnicode(content, "messages");
            messages.add(new ChatMessage(role, content));
        }
        if (tokenizer == null || tokenizer.chatTemplate().isEmpty()) {
            throw ApiException.badRequest("messages", "this model has no chat template (tokenizer_config.json chat_template)");
        }
        try {
            return tokenizer.applyChatTemplate(messages, true);
        } catch (IllegalArgumentException ex) {
            throw ApiException.badRequest("messages", ex.getMessage());
        }
    }

    private static String content(JsonElement c) {
        if (c != null && c.isJsonPrimitive() && c.getAsJsonPrimitive().isString()) {
            return c.getAsString();
        }
        if (c != null && c.isJsonArray()) {
            // [{"type": "text", "text": "..."}, ...]
            StringBuilder sb = new StringBuilder();
            for (JsonElement part : c.getAsJsonArray()) {
                if (!part.isJsonObject() || !"text".equals(optString(part.getAsJsonObject(), "type"))) {
                    throw ApiException.badRequest("messages", "only text content parts are supported");
                }
                sb.append(optString(part.getAsJsonObject(), "text"));
            }
            return sb.toString();
        }
        throw ApiException.badRequest("messages", "message content must be a string or an array of text parts");
    }

    private static List<String> stops(JsonObject o) {
        JsonElement e = o.get("stop");
        List<String> stops = new ArrayList<>();
        if (e == null || e.isJsonNull()) {
            return stops;
        }
        if (e.isJsonPrimitive() && e.getAsJsonPrimitive().isString()) {
            stops.add(e.getAsString());
        } else if (e.isJsonArray()) {
            for (JsonElement x : e.getAsJsonArray()) {
                if (!x.isJsonPrimitive() || !x.getAsJsonPrimitive().isString()) {
                    throw ApiException.badRequest("stop", "stop must be a string or an array of strings");
                }
                stops.add(x.getAsString());
            }
        } else {
            throw ApiException.badRequest("stop", "stop must be a string or an array of strings");
        }
        if (stops.size() > MAX_STOPS) {
            throw ApiException.badRequest("stop", "at most " + MAX_STOPS + " stop strings, got " + stops.size());
        }
        for (String s : stops) {
            if (s.isEmpty()) {
                throw ApiException.badRequest("stop", "stop strings must not be empty");
            }
        }
        return stops;
    }

    private static String optString(JsonObject o, String key) {
        JsonElement e = o.get(key);
        if (e == null || e.isJsonNull()) {
            return null;
        }
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isString()) {
            throw ApiException.badRequest(key, key + " must be a string");
        }
        return e.getAsString();
    }

    private static Double optNumber(JsonObject o, String key) {
        JsonElement e = o.get(key);
        if (e == null || e.isJsonNull()) {
            return null;
        }
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isNumber()) {
            throw ApiException.badRequest(key, key + " must be a number");
        }
        return e.getAsDouble();
    }

    private static Integer optInt(JsonObject o, String key) {
        JsonElement e = o.get(key);
        if (e == null || e.isJsonNull()) {
            return null;
        }
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isNumber()) {
            throw ApiException.badRequest(key, key + " must be an integer");
        }
        long v = exactLong(e.getAsJsonPrimitive(), key);
        if (v > Integer.MAX_VALUE || v < Integer.MIN_VALUE) {
            throw ApiException.badRequest(key, key + " is out of range: " + v);
        }
        return (int) v;
    }

    private static long longValue(JsonObject o, String key) {
        JsonElement e = o.get(key);
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isNumber()) {
            throw ApiException.badRequest(key, key + " must be an integer");
        }
        return exactLong(e.getAsJsonPrimitive(), key);
    }

    private static long exactLong(JsonPrimitive p, String key) {
        try {
            return p.getAsBigDecimal().longValueExact();
        } catch (ArithmeticException | NumberFormatException e) {
            throw ApiException.badRequest(key, key + " must be an integer, got " + p);
        }
    }

    private static boolean bool(JsonObject o, String key) {
        JsonElement e = o.get(key);
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isBoolean()) {
            throw ApiException.badRequest(key, key + " must be true or false");
        }
        return e.getAsBoolean();
    }
}
