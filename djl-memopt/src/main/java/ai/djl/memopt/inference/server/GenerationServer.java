package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.TextTokenizer;
import com.google.common.base.Preconditions;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import io.javalin.Javalin;
import io.javalin.http.Context;
import java.time.Duration;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * An OpenAI-compatible HTTP server (Javalin) over one {@link Generator}: {@code POST /v1/completions},
 * {@code POST /v1/chat/completions} (JSON, or server-sent events ending with {@code data: [DONE]} when
 * {@code "stream": true}), {@code GET /v1/models}, {@code GET /health}.
 *
 * <p>One worker thread runs the model. What the server takes on is bounded: the body size (413), a text prompt's
 * length before it is tokenized (400 {@code context_length_exceeded}), the requests admitted at once (running, queued
 * or being tokenized: {@code maxQueue + 1}) and the memory they are estimated to hold together (429 at once when the
 * room is taken, 413 for a request bigger than the whole budget), the open connections, and the time a client may take
 * to send its request (408). A wrong method gets 405 with {@code Allow}; every error is {@code {"error": {"message",
 * "type", "param", "code"}}}. A client that goes away cancels its generation. {@link #close()} stops taking requests
 * (503), lets running and queued ones finish for the grace period, then cancels the rest (running:
 * {@code finish_reason "cancelled"} with the tokens so far; queued: 503).
 *
 * <pre>{@code
 * try (GenerationServer server = GenerationServer.builder().setGenerator(generator).optTokenizer(tok)
 *         .optPort(8080).build().start()) {
 *     server.awaitStop();
 * }
 * }</pre>
 *
 * <p>The pieces: {@link CompletionRoutes} (the two POST routes), {@link RequestReader}, {@link OpenAiRequest} and
 * {@link Utf8Text} (body limits and validation), {@link Admission} (what is taken on), {@link GenerationWorker} and
 * {@link GenerationJob} (the queue and the model thread), {@link SseStream} (streaming), {@link ClientConnection}
 * (is the client still there), {@link HttpConnections} (connections, threads, read timeouts), {@link OpenAiResponses}
 * (the JSON shapes).
 */
public final class GenerationServer implements AutoCloseable {

    private static final Logger logger = LoggerFactory.getLogger(GenerationServer.class);

    /** The routes and their methods (for 405's {@code Allow}). */
    private static final Map<String, String> ROUTES =
            Map.of("/v1/completions", "POST", "/v1/chat/completions", "POST", "/v1/models", "GET", "/health", "GET");

    private final Generator generator;
    private final TextTokenizer tokenizer;
    private final String modelName;
    private final String host;
    private final long maxBodyBytes;
    private final Duration bodyTimeout;
    private final Duration shutdownGrace;
    private final OpenAiRequest.Limits limits;
    private final Admission admission;
    private final HttpConnections connections;

    /** HTTP exchanges between Javalin's before and after handlers: responses not yet fully written. */
    private final AtomicInteger exchanges = new AtomicInteger();
    private final CountDownLatch stopped = new CountDownLatch(1);
    private GenerationWorker worker;
    private CompletionRoutes completions;
    private Javalin app;
    private volatile boolean closing;

    private GenerationServer(Builder b) {
        this.generator = b.generator;
        this.tokenizer = b.tokenizer;
        this.modelName = b.modelName;
        this.host = b.host;
        this.maxBodyBytes = b.maxBodyBytes;
        this.bodyTimeout = b.bodyTimeout;
        this.shutdownGrace = b.shutdownGrace;
        int context = Math.min(b.maxContextLength, generator.model().maxLength());
        this.limits = new OpenAiRequest.Limits(b.maxTokens, Math.min(16, b.maxTokens), context, generator.model().vocabSize());
        this.admission = new Admission(b.maxQueue + 1, b.maxPendingBytes);
        this.connections = new HttpConnections(b.host, b.port, b.maxConnections, b.readTimeout);
    }

    public static Builder builder() {
        return new Builder();
    }

    /** Binds and starts serving. */
    public synchronized GenerationServer start() {
        Preconditions.checkState(app == null, "server already started");
        worker = new GenerationWorker();
        completions =
                new CompletionRoutes(generator, tokenizer, new RequestReader(maxBodyBytes, bodyTimeout, tokenizer, limits),
                        admission, worker, new OpenAiResponses(modelName), () -> closing);
        app =
                Javalin.create(
                        cfg -> {
                            cfg.showJavalinBanner = false;
                            cfg.startupWatcherEnabled = false;
                            cfg.http.maxRequestSize = maxBodyBytes;
                            cfg.http.prefer405over404 = true;
                            cfg.http.disableCompression(); // SSE chunks must reach the client as they are written
                            connections.configure(cfg);
                        });
        app.before(ctx -> exchanges.incrementAndGet());
        app.after(ctx -> exchanges.decrementAndGet());
        app.post("/v1/completions", ctx -> completions.handle(ctx, false));
        app.post("/v1/chat/completions", ctx -> completions.handle(ctx, true));
        app.get("/v1/models", this::models);
        app.get("/health", this::health);
        app.exception(ApiException.class, (e, ctx) -> OpenAiResponses.error(ctx, e));
        app.exception(
                Exception.class,
                (e, ctx) -> {
                    logger.error("request failed", e);
                    OpenAiResponses.error(ctx, new ApiException(500, "server_error", null, "internal error: " + e.getMessage()));
                });
        app.error(404, ctx -> {
            if (ctx.res().getContentType() == null || !ctx.res().getContentType().startsWith("application/json")) {
                OpenAiResponses.error(ctx, new ApiException(404, "invalid_request_error", null, "no route " + ctx.method() + " " + ctx.path()));
            }
        });
        app.error(405, ctx -> {
            String allow = ROUTES.get(ctx.path());
            if (allow != null) {
                ctx.header("Allow", allow);
            }
            OpenAiResponses.error(ctx, new ApiException(405, "invalid_request_error", null,
                    "method " + ctx.method() + " not allowed for " + ctx.path() + (allow != null ? ": use " + allow : "")));
        });
        app.start();
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

    /** Requests admitted and not yet answered: being tokenized, queued, running, or being written. */
    public int pending() {
        return admission.usage().requests();
    }

    /** What the server holds and has done. */
    public ServerStats stats() {
        CompletionRoutes c = completions;
        Admission.Usage u = admission.usage();
        return new ServerStats(u.requests(), admission.maxRequests(), u.bytes(), u.peakBytes(), admission.maxBytes(),
                u.peakRequests(), c == null ? 0 : c.tokenized.get(),
                c == null ? 0 : c.refusedUntokenized.get(), c == null ? 0 : c.cancelledByDisconnect.get(), connections.open(),
                connections.max());
    }

    private void health(Context ctx) {
        JsonObject o = new JsonObject();
        o.addProperty("status", closing ? "shutting_down" : "ok");
        o.addProperty("model", modelName);
        Admission.Usage u = admission.usage();
        o.addProperty("pending", u.requests());
        o.addProperty("pending_bytes", u.bytes());
        o.addProperty("max_pending_bytes", admission.maxBytes());
        OpenAiResponses.json(ctx, closing ? 503 : 200, o);
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
        OpenAiResponses.json(ctx, 200, o);
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
            worker.shutdown(shutdownGrace.toMillis());
            // let handlers write the last responses (results, cancellations, 503s) before the connector goes away;
            // responses are flushed inside the handlers, so an exchange that reached its after-handler is delivered
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
            while ((worker.pending() > 0 || exchanges.get() > 0) && System.nanoTime() < deadline) {
                Thread.sleep(10);
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        } finally {
            app.stop();
            stopped.countDown();
        }
    }

    /** The default memory budget of admitted requests: 4 GiB. */
    public static final long DEFAULT_MAX_PENDING_BYTES = 4L << 30;

    /** The default limit of open connections. */
    public static final int DEFAULT_MAX_CONNECTIONS = 256;

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
        private long maxPendingBytes = DEFAULT_MAX_PENDING_BYTES;
        private int maxConnections = DEFAULT_MAX_CONNECTIONS;
        private Duration readTimeout = Duration.ofSeconds(10);
        private Duration bodyTimeout = Duration.ofSeconds(30);

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

        /** Requests that may wait behind the running one (queued or being tokenized); more get 429. */
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

        /**
         * The context: prompt + max_tokens must fit. Default and upper bound: the model's
         * ({@link ai.djl.memopt.inference.LanguageModel#maxLength()}).
         */
        public Builder optMaxContextLength(int maxContextLength) {
            this.maxContextLength = maxContextLength;
            return this;
        }

        /**
         * The memory admitted requests may hold together, estimated per request: while its text is tokenized, the
         * tokenizer's working memory ({@link TextTokenizer#encodeMemoryEstimate}); after, its ids, its cache for prompt
         * + max_tokens and its logits ({@link Generator#memoryEstimate}). Default {@value #DEFAULT_MAX_PENDING_BYTES}.
         */
        public Builder optMaxPendingBytes(long maxPendingBytes) {
            this.maxPendingBytes = maxPendingBytes;
            return this;
        }

        /** Open HTTP connections at most; default {@value #DEFAULT_MAX_CONNECTIONS}. */
        public Builder optMaxConnections(int maxConnections) {
            this.maxConnections = maxConnections;
            return this;
        }

        /** A connection on which no byte arrives for this long is closed (408 while a body is read); default 10 s. */
        public Builder optReadTimeout(Duration readTimeout) {
            this.readTimeout = readTimeout;
            return this;
        }

        /** A request body must have arrived within this long once its headers have; default 30 s. */
        public Builder optBodyTimeout(Duration bodyTimeout) {
            this.bodyTimeout = bodyTimeout;
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
            Preconditions.checkArgument(maxPendingBytes >= 1, "maxPendingBytes must be >= 1, got %s", maxPendingBytes);
            Preconditions.checkArgument(maxConnections >= 1, "maxConnections must be >= 1, got %s", maxConnections);
            Preconditions.checkArgument(readTimeout != null && readTimeout.toMillis() >= 1, "readTimeout must be >= 1 ms, got %s", readTimeout);
            Preconditions.checkArgument(bodyTimeout != null && bodyTimeout.toMillis() >= 1, "bodyTimeout must be >= 1 ms, got %s", bodyTimeout);
            return new GenerationServer(this);
        }
    }
}
