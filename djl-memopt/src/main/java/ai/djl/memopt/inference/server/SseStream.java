package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.GenerationResult;
import com.google.gson.JsonObject;
import io.javalin.http.Context;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.function.BooleanSupplier;

/**
 * A generation streamed as server-sent events, as OpenAI streams: one {@code data: {json}} event per text delta (chat
 * starts with an empty assistant delta), a last chunk with the finish reason, then {@code data: [DONE]}. A client that
 * goes away (a write fails) cancels its generation.
 */
final class SseStream {

    private final OpenAiResponses responses;

    SseStream(OpenAiResponses responses) {
        this.responses = responses;
    }

    /**
     * Streams {@code job} to the client until it finishes, or until the client leaves: {@code clientGone} says so (it
     * is polled while no token comes, and cancels the job), or a write fails ({@code onWriteFailed} then cancels it).
     */
    void stream(Context ctx, GenerationJob job, BooleanSupplier clientGone, Runnable onWriteFailed)
            throws IOException, InterruptedException {
        ctx.status(200);
        ctx.res().setContentType("text/event-stream; charset=utf-8");
        ctx.res().setHeader("Cache-Control", "no-cache");
        OutputStream out = ctx.res().getOutputStream();
        boolean chat = job.chat;
        try {
            if (chat) {
                JsonObject delta = new JsonObject();
                delta.addProperty("role", "assistant");
                delta.addProperty("content", "");
                event(out, responses.chatChunk(job, delta, null));
            }
            while (true) {
                String delta = job.deltas.poll(50, TimeUnit.MILLISECONDS);
                if (delta != null) {
                    if (!delta.isEmpty()) {
                        event(out, chat ? responses.chatChunk(job, OpenAiResponses.content(delta), null)
                                : responses.textChunk(job, delta, null));
                    }
                    continue;
                }
                if (job.result.isDone() && job.deltas.isEmpty()) {
                    break;
                }
                if (clientGone.getAsBoolean()) {
                    return;
                }
            }
            finish(out, job, chat);
        } catch (IOException e) {
            if (job.markClientGone()) {
                onWriteFailed.run(); // nothing more to write
            }
        }
    }

    /** The last chunk (finish reason, or an error event), then {@code [DONE]}. */
    private void finish(OutputStream out, GenerationJob job, boolean chat) throws IOException, InterruptedException {
        GenerationResult r;
        try {
            r = job.result.get();
        } catch (ExecutionException e) {
            event(out, OpenAiResponses.errorBody(
                    new ApiException(500, "server_error", null, "generation failed: " + e.getCause())));
            r = null;
        }
        if (r != null) {
            String reason = r.finishReason().wireName();
            event(out, chat ? responses.chatChunk(job, new JsonObject(), reason) : responses.textChunk(job, "", reason));
        } else if (!job.result.isCompletedExceptionally()) {
            event(out, OpenAiResponses.errorBody(
                    new ApiException(503, "server_error", null, "the server shut down before the request started")));
        }
        out.write("data: [DONE]\n\n".getBytes(StandardCharsets.UTF_8));
        out.flush();
    }

    private static void event(OutputStream out, JsonObject o) throws IOException {
        out.write(("data: " + OpenAiResponses.GSON.toJson(o) + "\n\n").getBytes(StandardCharsets.UTF_8));
        out.flush();
    }
}
