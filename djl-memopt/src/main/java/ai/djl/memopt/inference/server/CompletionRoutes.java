package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.ContextLengthException;
import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.memopt.inference.TextTokenizer;
import io.javalin.http.Context;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicLong;
import java.util.function.BooleanSupplier;

/**
 * {@code POST /v1/completions} and {@code POST /v1/chat/completions}. A request goes through:
 *
 * <ol>
 *   <li>the body: size limit (413), deadline (408), UTF-8 and parameters (400), all before any tokenizing;
 *   <li>a text prompt certainly longer than the context leaves is refused without tokenizing (400
 *       {@code context_length_exceeded}): with a tokenizer whose tokens cover at most {@code b} bytes, {@code n} bytes
 *       are at least {@code n / b} tokens;
 *   <li>admission ({@link Admission}): a text is admitted with the tokenizer's working memory for it, is tokenized,
 *       and the hold becomes what its generation will hold (ids, cache for prompt + {@code max_tokens}, logits:
 *       {@link Generator#memoryEstimate}); 429 when the room is taken, 413 when the request needs more than the whole
 *       budget;
 *   <li>the generation worker; the answer as one JSON object or an event stream. A client that goes away cancels its
 *       generation.
 * </ol>
 */
final class CompletionRoutes {

    /** How often a waiting handler checks that its client is still connected. */
    private static final long PROBE_MILLIS = 50;

    private final Generator generator;
    private final TextTokenizer tokenizer;
    private final RequestReader reader;
    private final Admission admission;
    private final GenerationWorker worker;
    private final OpenAiResponses responses;
    private final SseStream sse;
    private final BooleanSupplier closing;
    final AtomicLong refusedUntokenized = new AtomicLong();
    final AtomicLong tokenized = new AtomicLong();
    final AtomicLong cancelledByDisconnect = new AtomicLong();

    CompletionRoutes(Generator generator, TextTokenizer tokenizer, RequestReader reader, Admission admission,
            GenerationWorker worker, OpenAiResponses responses, BooleanSupplier closing) {
        this.generator = generator;
        this.tokenizer = tokenizer;
        this.reader = reader;
        this.admission = admission;
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
        long textBytes = 0;
        if (req.promptText != null) {
            textBytes = TextTokenizer.utf8Length(req.promptText);
            long fewest = tokenizer.fewestTokens(textBytes);
            if (fewest > req.maxPromptTokens()) {
                refusedUntokenized.incrementAndGet();
                throw ApiException.contextLength(req.promptParam(), "the prompt is " + textBytes + " bytes of UTF-8, at least "
                        + fewest + " tokens (a token covers at most " + tokenizer.maxBytesPerToken().getAsInt()
                        + " bytes), more than the " + req.maxPromptTokens() + " tokens the context of "
                        + req.contextLength() + " leaves; refused without tokenizing");
            }
        }
        long need = req.promptIds != null
                ? generator.memoryEstimate(req.promptIds.length, req.maxNewTokens(req.promptIds.length))
                : TextTokenizer.encodeMemoryEstimate(textBytes);
        try (Admission.Ticket ticket = admission.admit(need, req.promptIds != null ? "ids, cache and logits" : "tokenizing")) {
            long[] ids = req.promptIds != null ? req.promptIds : tokenize(req);
            SamplingParams params = req.params(ids.length);
            ticket.resize(generator.memoryEstimate(ids.length, params.maxNewTokens()),
                    ids.length + " prompt tokens and " + params.maxNewTokens() + " new: ids, cache and logits");
            GenerationJob job = new GenerationJob(chat, req.stream, ids, params, generator);
            worker.submit(job);
            try {
                ClientConnection client = new ClientConnection(ctx);
                if (req.stream) {
                    sse.stream(ctx, job, () -> clientGone(client, job), () -> cancelForGoneClient(job));
                } else {
                    GenerationResult r = await(job, client);
                    if (r != null) {
                        OpenAiResponses.json(ctx, 200, chat ? responses.chatCompletion(job, r) : responses.completion(job, r));
                    }
                }
            } finally {
                // the hold is given back only when the generation has really stopped
                if (!job.result.isDone()) {
                    worker.cancel(job);
                }
                awaitQuietly(job);
                worker.done(job);
            }
        }
    }

    private long[] tokenize(OpenAiRequest req) {
        tokenized.incrementAndGet();
        try {
            return tokenizer.encode(req.promptText, req.addSpecialTokens(), req.maxPromptTokens());
        } catch (ContextLengthException e) {
            throw ApiException.contextLength(req.promptParam(), e.getMessage() + " (the context of " + req.contextLength()
                    + " tokens less max_tokens)");
        }
    }

    private static void awaitQuietly(GenerationJob job) {
        boolean interrupted = false;
        while (!job.result.isDone()) {
            try {
                job.result.get();
            } catch (InterruptedException e) {
                interrupted = true;
            } catch (ExecutionException e) {
                break;
            }
        }
        if (interrupted) {
            Thread.currentThread().interrupt();
        }
    }

    /** Whether the client left; if so, the job is cancelled. */
    private boolean clientGone(ClientConnection client, GenerationJob job) {
        if (!job.clientGone() && client.gone() && job.markClientGone()) {
            cancelForGoneClient(job);
        }
        return job.clientGone();
    }

    private void cancelForGoneClient(GenerationJob job) {
        worker.cancel(job);
        cancelledByDisconnect.incrementAndGet();
    }

    /** The result; null if the client went away (nothing to answer). */
    private GenerationResult await(GenerationJob job, ClientConnection client) throws InterruptedException {
        try {
            GenerationResult r;
            while (true) {
                try {
                    r = job.result.get(PROBE_MILLIS, TimeUnit.MILLISECONDS);
                    break;
                } catch (TimeoutException e) {
                    clientGone(client, job);
                }
            }
            if (job.clientGone()) {
                return null;
            }
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
