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

/** A validated OpenAI completion or chat-completion request: prompt ids, sampling params, streaming flag. */
final class OpenAiRequest {

    private static final Set<String> ROLES = Set.of("system", "user", "assistant", "tool");
    private static final int MAX_STOPS = 4;

    final boolean chat;
    final long[] promptIds;
    final SamplingParams params;
    final boolean stream;
    final String model;

    private OpenAiRequest(boolean chat, long[] promptIds, SamplingParams params, boolean stream, String model) {
        this.chat = chat;
        this.promptIds = promptIds;
        this.params = params;
        this.stream = stream;
        this.model = model;
    }

    /** Limits the server applies to every request. */
    record Limits(int maxTokens, int defaultCompletionTokens, int maxContextLength, int vocabSize) {}

    static OpenAiRequest parse(byte[] body, boolean chat, TextTokenizer tokenizer, Limits limits) {
        JsonObject o;
        try {
            JsonElement e = JsonParser.parseString(new String(body, java.nio.charset.StandardCharsets.UTF_8));
            if (!e.isJsonObject()) {
                throw ApiException.badRequest(null, "the request body must be a JSON object");
            }
            o = e.getAsJsonObject();
        } catch (JsonParseException | IllegalStateException e) {
            throw ApiException.badRequest(null, "malformed JSON: " + e.getMessage());
        }
        String model = optString(o, "model");
        long[] prompt;
        if (chat) {
            prompt = chatPrompt(o, tokenizer);
        } else {
            prompt = completionPrompt(o, tokenizer);
        }
        if (prompt.length == 0) {
            throw ApiException.badRequest(chat ? "messages" : "prompt", "the prompt is empty");
        }
        for (long id : prompt) {
            if (id < 0 || id >= limits.vocabSize()) {
                throw ApiException.badRequest("prompt", "token id " + id + " is outside the vocabulary [0, " + limits.vocabSize() + ")");
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
        int max;
        if (maxTokens == null) {
            max = chat ? limits.maxTokens() : limits.defaultCompletionTokens();
            max = Math.min(max, limits.maxContextLength() - prompt.length);
            if (max < 1) {
                throw ApiException.badRequest(chat ? "messages" : "prompt",
                        "the prompt (" + prompt.length + " tokens) fills the context of " + limits.maxContextLength() + " tokens");
            }
        } else {
            max = maxTokens;
            if (max < 1 || max > limits.maxTokens()) {
                throw ApiException.badRequest("max_tokens", "max_tokens must be in [1, " + limits.maxTokens() + "], got " + max);
            }
            if ((long) prompt.length + max > limits.maxContextLength()) {
                throw ApiException.badRequest("max_tokens",
                        "prompt (" + prompt.length + " tokens) + max_tokens (" + max + ") exceeds the context of " + limits.maxContextLength() + " tokens");
            }
        }
        SamplingParams.Builder p = SamplingParams.builder().setMaxNewTokens(max);
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
        return new OpenAiRequest(chat, prompt, p.build(), stream, model);
    }

    private static long[] completionPrompt(JsonObject o, TextTokenizer tokenizer) {
        JsonElement e = o.get("prompt");
        if (e == null || e.isJsonNull()) {
            throw ApiException.badRequest("prompt", "prompt is required");
        }
        if (e.isJsonPrimitive() && e.getAsJsonPrimitive().isString()) {
            return encode(e.getAsString(), tokenizer);
        }
        if (e.isJsonArray()) {
            JsonArray a = e.getAsJsonArray();
            if (a.size() == 1 && a.get(0).isJsonPrimitive() && a.get(0).getAsJsonPrimitive().isString()) {
                return encode(a.get(0).getAsString(), tokenizer);
            }
            long[] ids = new long[a.size()];
            for (int i = 0; i < ids.length; i++) {
                JsonElement x = a.get(i);
                if (!x.isJsonPrimitive() || !x.getAsJsonPrimitive().isNumber()) {
                    throw ApiException.badRequest("prompt", "prompt must be a string, or an array of token ids (one prompt per request)");
                }
                ids[i] = exactLong(x.getAsJsonPrimitive(), "prompt");
            }
            return ids;
        }
        throw ApiException.badRequest("prompt", "prompt must be a string or an array of token ids");
    }

    private static long[] encode(String text, TextTokenizer tokenizer) {
        if (tokenizer == null) {
            throw ApiException.badRequest("prompt", "this server has no tokenizer: send the prompt as token ids");
        }
        return tokenizer.encode(text);
    }

    private static long[] chatPrompt(JsonObject o, TextTokenizer tokenizer) {
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
            messages.add(new ChatMessage(role, content(mo.get("content"))));
        }
        if (tokenizer == null || tokenizer.chatTemplate().isEmpty()) {
            throw ApiException.badRequest("messages", "this model has no chat template (tokenizer_config.json chat_template)");
        }
        try {
            return tokenizer.encodeChat(messages, true);
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
