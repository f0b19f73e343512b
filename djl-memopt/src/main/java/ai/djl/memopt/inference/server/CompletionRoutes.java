package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.Generator;
import io.javalin.http.Context;
import java.util.concurrent.ExecutionException;
import java.util.function.BooleanSupplier;

/**
 * {@code POST /v1/completions} and {@code POST /v1/chat/completions}: read and validate the request, queue it on the
 * worker, then answer with one JSON response or an event stream.
 */
final class CompletionRoutes {

    private final Generator generator;
    private final RequestReader reader;
    private final GenerationWorker worker;
    private final OpenAiResponses responses;
    private final SseStream sse;
    private final BooleanSupplier closing;

    CompletionRoutes(Generator generator, RequestReader reader, GenerationWorker worker, OpenAiResponses responses,
            BooleanSupplier closing) {
        this.generator = generator;
        this.reader = reader;
        this.worker = worker;
        this.responses = responses;
        this.sse = new SseStream(responses);
        this.closing = closing;
    }

    void handle(Context ctx, boolean chat) throws Exception {
        if (closing.getAsBoolean()) {
            throw ApiException.shuttingDown();
        }
        OpenAiRequest req = reader.read(ctx, chat);
        GenerationJob job = new GenerationJob(req, generator);
        worker.submit(job);
        try {
            if (req.stream) {
                sse.stream(ctx, job);
            } else {
                GenerationResult r = await(job);
                OpenAiResponses.json(ctx, 200, chat ? responses.chatCompletion(job, r) : responses.completion(job, r));
            }
        } finally {
            worker.done(job);
        }
    }

    private static GenerationResult await(GenerationJob job) throws InterruptedException {
        try {
            GenerationResult r = job.result.get();
            if (r == null) {
                throw new ApiException(503, "server_error", null, "the server shut down before the request started");
            }
            return r;
        } catch (ExecutionException e) {
            Throwable cause = e.getCause();
            if (cause instanceof IllegalArgumentException) {
                throw ApiException.badRequest(null, cause.getMessage());
            }
            throw new ApiException(500, "server_error", null, "generation failed: " + cause);
        }
    }
}
