package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.TextTokenizer;
import ai.djl.ndarray.NDManager;
import com.google.common.base.Preconditions;
import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import io.javalin.Javalin;
import io.javalin.http.Context;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.RejectedExecutionException;
import java.util.concurrent.SynchronousQueue;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * An OpenAI-compatible HTTP server (Javalin) over one {@link Generator}: {@code POST /v1/completions},
 * {@code POST /v1/chat/completions} (JSON, or server-sent events ending with {@code data: [DONE]} when
 * {@code "stream": true}), {@code GET /v1/models}, {@code GET /health}.
 *
 * <p>One worker thread runs the model; requests wait in a bounded queue and a full queue is answered 429 at once.
 * Bodies over the size limit get 413, bad JSON or parameters 400, all with {@code {"error": {"message", "type",
 * "param", "code"}}}. {@link #close()} stops taking requests (503), lets running and queued ones finish for the grace
 * period, then cancels the rest (running: {@code finish_reason "cancelled"} with the tokens so far; queued: 503).
 *
 * <pre>{@code
 * try (GenerationServer server = GenerationServer.builder().setGenerator(generator).setTokenizer(tok)
 *         .optPort(8080).build().start()) {
 *     server.awaitStop();
 * }
 * }</pre>
 */
public final class GenerationServer implements AutoCloseable {

    private static final Logger logger = LoggerFactory.getLogger(GenerationServer.class);
    private static final Gson GSON = new GsonBuilder().serializeNulls().disableHtmlEscaping().create();

    private final Generator generator;
    private final TextTokenizer tokenizer;
    private final String modelName;
    private final String host;
    private final int requestedPort;
    private final int maxQueue;
    private final long maxBodyBytes;
    private final Duration shutdownGrace;
    private final OpenAiRequest.Limits limits;

    private final Set<Job> jobs = ConcurrentHashMap.newKeySet();
    /** HTTP exchanges between Javalin's before and after handlers: responses not yet fully written. */
    private final java.util.concurrent.atomic.AtomicInteger exchanges = new java.util.concurrent.atomic.AtomicInteger();
    private final CountDownLatch stopped = new CountDownLatch(1);
    private ThreadPoolExecutor worker;
    private Javalin app;
    private volatile boolean closing;

    private GenerationServer(Builder b) {
        this.generator = b.generator;
        this.tokenizer = b.tokenizer;
        this.modelName = b.modelName;
        this.host = b.host;
        this.requestedPort = b.port;
        this.maxQueue = b.maxQueue;
        this.maxBodyBytes = b.maxBodyBytes;
        this.shutdownGrace = b.shutdownGrace;
        this.limits =
                new OpenAiRequest.Limits(b.maxTokens, Math.min(16, b.maxTokens), b.maxContextLength, generator.model().vocabSize());
    }

    public static Builder builder() {
        return new Builder();
    }

    /** Binds and starts serving. */
    public synchronized GenerationServer start() {
        Preconditions.checkState(app == null, "server already started");
        BlockingQueue<Runnable> queue = maxQueue == 0 ? new SynchronousQueue<>() : new ArrayBlockingQueue<>(maxQueue);
        worker =
                new ThreadPoolExecutor(
                        1,
                        1,
                        0,
                        TimeUnit.MILLISECONDS,
                        queue,
                        r -> {
                            Thread t = new Thread(r, "memopt-generation-worker");
                            t.setDaemon(true);
                            return t;
                        },
                        new ThreadPoolExecutor.AbortPolicy());
        app =
                Javalin.create(
                        cfg -> {
                            cfg.showJavalinBanner = false;
                            cfg.startupWatcherEnabled = false;
                            cfg.http.maxRequestSize = maxBodyBytes;
                            cfg.http.disableCompression(); // SSE chunks must reach the client as they are written
                        });
        app.before(ctx -> exchanges.incrementAndGet());
        app.after(ctx -> exchanges.decrementAndGet());
        app.post("/v1/completions", ctx -> handle(ctx, false));
        app.post("/v1/chat/completions", ctx -> handle(ctx, true));
        app.get("/v1/models", this::models);
        app.get("/health", this::health);
        app.exception(ApiException.class, (e, ctx) -> error(ctx, e));
        app.exception(
                Exception.class,
                (e, ctx) -> {
                    logger.error("request failed", e);
                    error(ctx, new ApiException(500, "server_error", null, "internal error: " + e.getMessage()));
                });
        app.error(404, ctx -> {
            if (ctx.res().getContentType() == null || !ctx.res().getContentType().startsWith("application/json")) {
                error(ctx, new ApiException(404, "invalid_request_error", null, "no route " + ctx.method() + " " + ctx.path()));
            }
        });
        app.error(405, ctx -> error(ctx, new ApiException(405, "invalid_request_error", null, "method not allowed: " + ctx.method() + " " + ctx.path())));
        app.start(host, requestedPort);
        logger.info("memopt server on http://{}:{} (model {})", host, app.port(), modelName);
        return this;
    }

    /** The bound port (useful with port 0). */
    public int port() {
        Preconditions.checkState(app != null, "server not started");
        return app.port();
    }

    public String host() {
        return host;
    }

    /** Blocks until {@link #close()} has finished. */
    public void awaitStop() throws InterruptedException {
        stopped.await();
    }

    /** Requests waiting or running. */
    public int pending() {
        return jobs.size();
    }

    private void health(Context ctx) {
        JsonObject o = new JsonObject();
        o.addProperty("status", closing ? "shutting_down" : "ok");
        o.addProperty("model", modelName);
        o.addProperty("pending", jobs.size());
        json(ctx, closing ? 503 : 200, o);
    }

    private void models(Context ctx) {
        JsonObject m = new JsonObject();
        m.addProperty("id", modelName);
        m.addProperty("object", "model");
        m.addProperty("owned_by", "djl-memopt");
        JsonArray data = new JsonArray();
        data.add(m);
        JsonObject o = new JsonObject();
        o.addProperty("object", "list");
        o.add("data", data);
        json(ctx, 200, o);
    }

    private void handle(Context ctx, boolean chat) throws Exception {
        if (closing) {
            throw new ApiException(503, "server_error", null, "the server is shutting down");
        }
        OpenAiRequest req = OpenAiRequest.parse(readBody(ctx), chat, tokenizer, limits);
        Job job = new Job(req);
        jobs.add(job);
        try {
            try {
                worker.execute(job);
            } catch (RejectedExecutionException e) {
                if (closing) {
                    throw new ApiException(503, "server_error", null, "the server is shutting down");
                }
                ctx.header("Retry-After", "1");
                throw new ApiException(429, "rate_limit_error", null, "the server is busy: " + maxQueue + " requests are already waiting");
            }
            if (req.stream) {
                stream(ctx, job);
            } else {
                GenerationResult r = await(job);
                json(ctx, 200, chat ? chatResponse(job, r) : completionResponse(job, r));
            }
        } finally {
            jobs.remove(job);
        }
    }

    private GenerationResult await(Job job) throws InterruptedException {
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

    private void stream(Context ctx, Job job) throws IOException, InterruptedException {
        ctx.status(200);
        ctx.res().setContentType("text/event-stream; charset=utf-8");
        ctx.res().setHeader("Cache-Control", "no-cache");
        OutputStream out = ctx.res().getOutputStream();
        boolean chat = job.req.chat;
        try {
            if (chat) {
                JsonObject delta = new JsonObject();
                delta.addProperty("role", "assistant");
                delta.addProperty("content", "");
                event(out, chunk(job, delta, null));
            }
            while (true) {
                String delta = job.deltas.poll(50, TimeUnit.MILLISECONDS);
                if (delta != null) {
                    if (!delta.isEmpty()) {
                        event(out, chat ? chunk(job, content(delta), null) : textChunk(job, delta, null));
                    }
                    continue;
                }
                if (job.result.isDone() && job.deltas.isEmpty()) {
                    break;
                }
            }
            GenerationResult r;
            try {
                r = job.result.get();
            } catch (ExecutionException e) {
                JsonObject err = errorBody(new ApiException(500, "server_error", null, "generation failed: " + e.getCause()));
                event(out, err);
                r = null;
            }
            if (r != null) {
                String reason = r.finishReason().wireName();
                event(out, chat ? chunk(job, new JsonObject(), reason) : textChunk(job, "", reason));
            } else if (!job.result.isCompletedExceptionally()) {
                event(out, errorBody(new ApiException(503, "server_error", null, "the server shut down before the request started")));
            }
            out.write("data: [DONE]\n\n".getBytes(StandardCharsets.UTF_8));
            out.flush();
        } catch (IOException e) {
            job.cancelled = true; // the client went away: stop generating for it
            throw e;
        }
    }

    private static void event(OutputStream out, JsonObject o) throws IOException {
        out.write(("data: " + GSON.toJson(o) + "\n\n").getBytes(StandardCharsets.UTF_8));
        out.flush();
    }

    private static JsonObject content(String text) {
        JsonObject d = new JsonObject();
        d.addProperty("content", text);
        return d;
    }

    private JsonObject header(Job job, String object) {
        JsonObject o = new JsonObject();
        o.addProperty("id", job.id);
        o.addProperty("object", object);
        o.addProperty("created", job.created);
        o.addProperty("model", modelName);
        return o;
    }

    private JsonObject textChunk(Job job, String text, String finishReason) {
        JsonObject o = header(job, "text_completion");
        JsonObject c = new JsonObject();
        c.addProperty("text", text);
        c.addProperty("index", 0);
        c.add("logprobs", JsonNull.INSTANCE);
        c.addProperty("finish_reason", finishReason);
        JsonArray choices = new JsonArray();
        choices.add(c);
        o.add("choices", choices);
        return o;
    }

    private JsonObject chunk(Job job, JsonObject delta, String finishReason) {
        JsonObject o = header(job, "chat.completion.chunk");
        JsonObject c = new JsonObject();
        c.addProperty("index", 0);
        c.add("delta", delta);
        c.add("logprobs", JsonNull.INSTANCE);
        c.addProperty("finish_reason", finishReason);
        JsonArray choices = new JsonArray();
        choices.add(c);
        o.add("choices", choices);
        return o;
    }

    private JsonObject completionResponse(Job job, GenerationResult r) {
        JsonObject o = textChunk(job, text(r), r.finishReason().wireName());
        o.add("usage", usage(r));
        return o;
    }

    private JsonObject chatResponse(Job job, GenerationResult r) {
        JsonObject o = header(job, "chat.completion");
        JsonObject message = new JsonObject();
        message.addProperty("role", "assistant");
        message.addProperty("content", text(r));
        JsonObject c = new JsonObject();
        c.addProperty("index", 0);
        c.add("message", message);
        c.add("logprobs", JsonNull.INSTANCE);
        c.addProperty("finish_reason", r.finishReason().wireName());
        JsonArray choices = new JsonArray();
        choices.add(c);
        o.add("choices", choices);
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

    private byte[] readBody(Context ctx) throws IOException {
        long declared = ctx.req().getContentLengthLong();
        if (declared > maxBodyBytes) {
            throw tooLarge();
        }
        try (InputStream in = ctx.req().getInputStream()) {
            byte[] body = in.readNBytes((int) Math.min(Integer.MAX_VALUE - 8, maxBodyBytes + 1));
            if (body.length > maxBodyBytes) {
                throw tooLarge();
            }
            return body;
        }
    }

    private ApiException tooLarge() {
        return new ApiException(413, "invalid_request_error", null, "the request body exceeds " + maxBodyBytes + " bytes");
    }

    private static JsonObject errorBody(ApiException e) {
        JsonObject err = new JsonObject();
        err.addProperty("message", e.getMessage());
        err.addProperty("type", e.type);
        err.addProperty("param", e.param);
        err.add("code", JsonNull.INSTANCE);
        JsonObject o = new JsonObject();
        o.add("error", err);
        return o;
    }

    private static void error(Context ctx, ApiException e) {
        json(ctx, e.status, errorBody(e));
    }

    /**
     * Writes and flushes a JSON response inside the handler. {@code ctx.result} would leave the writing to Javalin
     * after the handler returns, so {@link #close()} could stop the connector between a request leaving
     * {@code jobs} and its bytes reaching the client.
     */
    private static void json(Context ctx, int status, JsonObject body) {
        byte[] bytes = GSON.toJson(body).getBytes(java.nio.charset.StandardCharsets.UTF_8);
        ctx.status(status);
        ctx.contentType("application/json");
        try {
            ctx.res().setContentLength(bytes.length);
            java.io.OutputStream out = ctx.res().getOutputStream();
            out.write(bytes);
            out.flush();
        } catch (java.io.IOException e) {
            // the client went away: nothing to answer
            logger.debug("response not delivered: {}", e.toString());
        }
    }

    /**
     * Stops taking requests, gives running and queued ones the grace period, cancels what is left, then stops the
     * HTTP server. Idempotent.
     */
    @Override
    public synchronized void close() {
        if (app == null || closing) {
            return;
        }
        closing = true;
        try {
            worker.shutdown();
            if (!worker.awaitTermination(shutdownGrace.toMillis(), TimeUnit.MILLISECONDS)) {
                logger.info("cancelling {} request(s) still running after {}", jobs.size(), shutdownGrace);
                for (Job j : jobs) {
                    j.cancelled = true;
                }
                if (!worker.awaitTermination(60, TimeUnit.SECONDS)) {
                    logger.warn("the generation worker did not stop within 60 s");
                    worker.shutdownNow();
                }
            }
            // let handlers write the last responses (results, cancellations, 503s) before the connector goes away;
            // responses are flushed inside the handlers, so an exchange that reached its after-handler is delivered
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
            while ((!jobs.isEmpty() || exchanges.get() > 0) && System.nanoTime() < deadline) {
                Thread.sleep(10);
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        } finally {
            app.stop();
            stopped.countDown();
        }
    }

    /** One request on the worker. */
    private final class Job implements Runnable {
        final OpenAiRequest req;
        final String id;
        final long created = System.currentTimeMillis() / 1000;
        final CompletableFuture<GenerationResult> result = new CompletableFuture<>();
        final BlockingQueue<String> deltas = new LinkedBlockingQueue<>();
        volatile boolean cancelled;

        Job(OpenAiRequest req) {
            this.req = req;
            this.id = (req.chat ? "chatcmpl-" : "cmpl-") + UUID.randomUUID().toString().replace("-", "");
        }

        @Override
        public void run() {
            if (cancelled) {
                result.complete(null); // never started
                return;
            }
            try (NDManager manager = NDManager.newBaseManager(generator.model().device())) {
                List<GenerationResult> r =
                        generator.generate(
                                manager,
                                List.of(req.promptIds),
                                req.params,
                                req.stream ? (i, token, delta) -> deltas.add(delta) : null,
                                () -> cancelled);
                result.complete(r.get(0));
            } catch (Throwable t) {
                logger.error("generation failed", t);
                result.completeExceptionally(t);
            }
        }
    }

    /** Builder for {@link GenerationServer}. */
    public static final class Builder {
        private Generator generator;
        private TextTokenizer tokenizer;
        private String modelName = "memopt";
        private String host = "127.0.0.1";
        private int port = 8080;
        private int maxQueue = 16;
        private long maxBodyBytes = 1 << 20;
        private int maxTokens = 4096;
        private int maxContextLength = Integer.MAX_VALUE;
        private Duration shutdownGrace = Duration.ofSeconds(30);

        private Builder() {}

        /** Required: the model and decoding loop. */
        public Builder setGenerator(Generator generator) {
            this.generator = generator;
            return this;
        }

        /** For text prompts, chat, stop strings and text output; without one, prompts must be token ids. */
        public Builder optTokenizer(TextTokenizer tokenizer) {
            this.tokenizer = tokenizer;
            return this;
        }

        public Builder optModelName(String modelName) {
            this.modelName = modelName;
            return this;
        }

        /** Interface to bind; 127.0.0.1 by default. */
        public Builder optHost(String host) {
            this.host = host;
            return this;
        }

        /** 0 picks a free port. */
        public Builder optPort(int port) {
            this.port = port;
            return this;
        }

        /** Requests that may wait behind the running one; more get 429. */
        public Builder optMaxQueue(int maxQueue) {
            this.maxQueue = maxQueue;
            return this;
        }

        public Builder optMaxBodyBytes(long maxBodyBytes) {
            this.maxBodyBytes = maxBodyBytes;
            return this;
        }

        /** The largest {@code max_tokens} accepted. */
        public Builder optMaxTokens(int maxTokens) {
            this.maxTokens = maxTokens;
            return this;
        }

        /** The model's context: prompt + max_tokens must fit. */
        public Builder optMaxContextLength(int maxContextLength) {
            this.maxContextLength = maxContextLength;
            return this;
        }

        public Builder optShutdownGrace(Duration shutdownGrace) {
            this.shutdownGrace = shutdownGrace;
            return this;
        }

        public GenerationServer build() {
            Preconditions.checkArgument(generator != null, "a generator is required");
            Preconditions.checkArgument(host != null && !host.isBlank(), "host must not be blank");
            Preconditions.checkArgument(port >= 0 && port <= 65535, "port must be in [0, 65535], got %s", port);
            Preconditions.checkArgument(maxQueue >= 0, "maxQueue must be >= 0, got %s", maxQueue);
            Preconditions.checkArgument(maxBodyBytes >= 1024, "maxBodyBytes must be >= 1024, got %s", maxBodyBytes);
            Preconditions.checkArgument(maxTokens >= 1, "maxTokens must be >= 1, got %s", maxTokens);
            Preconditions.checkArgument(maxContextLength >= 2, "maxContextLength must be >= 2, got %s", maxContextLength);
            Preconditions.checkArgument(shutdownGrace != null && !shutdownGrace.isNegative(), "shutdownGrace must be >= 0");
            return new GenerationServer(this);
        }
    }
}
