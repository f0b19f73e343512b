package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.GenerationResult;
import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import io.javalin.http.Context;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The JSON shapes the server answers with, as OpenAI's API defines them: completions ({@code text_completion}), chat
 * completions ({@code chat.completion}), their streamed chunks, and {@code {"error": {...}}}; and writing a JSON
 * response inside the handler.
 */
final class OpenAiResponses {

    private static final Logger logger = LoggerFactory.getLogger(OpenAiResponses.class);
    static final Gson GSON = new GsonBuilder().serializeNulls().disableHtmlEscaping().create();

    private final String modelName;

    OpenAiResponses(String modelName) {
        this.modelName = modelName;
    }

    private JsonObject header(GenerationJob job, String object) {
        JsonObject o = new JsonObject();
        o.addProperty("id", job.id);
        o.addProperty("object", object);
        o.addProperty("created", job.created);
        o.addProperty("model", modelName);
        return o;
    }

    private static JsonObject withChoice(JsonObject o, JsonObject choice) {
        JsonArray choices = new JsonArray();
        choices.add(choice);
        o.add("choices", choices);
        return o;
    }

    /** A completion, or one streamed piece of one ({@code finishReason} null until the last). */
    JsonObject textChunk(GenerationJob job, String text, String finishReason) {
        JsonObject c = new JsonObject();
        c.addProperty("text", text);
        c.addProperty("index", 0);
        c.add("logprobs", JsonNull.INSTANCE);
        c.addProperty("finish_reason", finishReason);
        return withChoice(header(job, "text_completion"), c);
    }

    /** One streamed piece of a chat completion. */
    JsonObject chatChunk(GenerationJob job, JsonObject delta, String finishReason) {
        JsonObject c = new JsonObject();
        c.addProperty("index", 0);
        c.add("delta", delta);
        c.add("logprobs", JsonNull.INSTANCE);
        c.addProperty("finish_reason", finishReason);
        return withChoice(header(job, "chat.completion.chunk"), c);
    }

    static JsonObject content(String text) {
        JsonObject d = new JsonObject();
        d.addProperty("content", text);
        return d;
    }

    JsonObject completion(GenerationJob job, GenerationResult r) {
        JsonObject o = textChunk(job, text(r), r.finishReason().wireName());
        o.add("usage", usage(r));
        return o;
    }

    JsonObject chatCompletion(GenerationJob job, GenerationResult r) {
        JsonObject message = new JsonObject();
        message.addProperty("role", "assistant");
        message.addProperty("content", text(r));
        JsonObject c = new JsonObject();
        c.addProperty("index", 0);
        c.add("message", message);
        c.add("logprobs", JsonNull.INSTANCE);
        c.addProperty("finish_reason", r.finishReason().wireName());
        JsonObject o = withChoice(header(job, "chat.completion"), c);
        o.add("usage", usage(r));
        return o;
    }

    private static String text(GenerationResult r) {
        return r.text() == null ? "" : r.text();
    }

    private static JsonObject usage(GenerationResult r) {
        JsonObject u = new JsonObject();
        u.addProperty("prompt_tokens", r.promptIds().length);
        u.addProperty("completion_tokens", r.outputIds().length);
        u.addProperty("total_tokens", r.promptIds().length + r.outputIds().length);
        // not in OpenAI's schema: the ids themselves, handy for testing and for id-level clients
        JsonArray ids = new JsonArray();
        for (long id : r.outputIds()) {
            ids.add(id);
        }
        u.add("completion_token_ids", ids);
        return u;
    }

    static JsonObject errorBody(ApiException e) {
        JsonObject err = new JsonObject();
        err.addProperty("message", e.getMessage());
        err.addProperty("type", e.type);
        err.addProperty("param", e.param);
        err.addProperty("code", e.code);
        JsonObject o = new JsonObject();
        o.add("error", err);
        return o;
    }

    static void error(Context ctx, ApiException e) {
        if (e.retryAfterSeconds > 0) {
            ctx.header("Retry-After", String.valueOf(e.retryAfterSeconds));
        }
        json(ctx, e.status, errorBody(e));
    }

    /**
     * Writes and flushes a JSON response inside the handler. {@code ctx.result} would leave the writing to Javalin
     * after the handler returns, so {@link GenerationServer#close()} could stop the connector between a request leaving
     * the queue and its bytes reaching the client.
     */
    static void json(Context ctx, int status, JsonObject body) {
        byte[] bytes = GSON.toJson(body).getBytes(StandardCharsets.UTF_8);
        ctx.status(status);
        ctx.contentType("application/json");
        try {
            ctx.res().setContentLength(bytes.length);
            OutputStream out = ctx.res().getOutputStream();
            out.write(bytes);
            out.flush();
        } catch (IOException e) {
            // the client went away: nothing to answer
            logger.debug("response not delivered: {}", e.toString());
        }
    }
}
