package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.TextTokenizer;
import com.google.common.base.Preconditions;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import io.javalin.Javalin;
import io.javalin.http.Context;
import java.time.Duration;
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
 *
 * <p>The pieces: {@link CompletionRoutes} (the two POST routes), {@link RequestReader} and {@link OpenAiRequest}
 * (body limits and validation), {@link GenerationWorker} and {@link GenerationJob} (the queue and the model thread),
 * {@link SseStream} (streaming), {@link OpenAiResponses} (the JSON shapes).
 */
public final class GenerationServer implements AutoCloseable {

    private static final Logger logger = LoggerFactory.getLogger(GenerationServer.class);

    private final Generator generator;
    private final TextTokenizer tokenizer;
    private final String modelName;
    private final String host;
    private final int requestedPort;
    private final int maxQueue;
    private final long maxBodyBytes;
    private final Duration shutdownGrace;
    private final OpenAiRequest.Limits limits;

    /** HTTP exchanges between Javalin's before and after handlers: responses not yet fully written. */
    private final AtomicInteger exchanges = new AtomicInteger();
    private final CountDownLatch stopped = new CountDownLatch(1);
    private GenerationWorker worker;
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
        worker = new GenerationWorker(maxQueue);
        CompletionRoutes completions =
                new CompletionRoutes(generator, new RequestReader(maxBodyBytes, tokenizer, limits), worker,
                        new OpenAiResponses(modelName), () -> closing);
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
        app.error(405, ctx -> OpenAiResponses.error(ctx, new ApiException(405, "invalid_request_error", null, "method not allowed: " + ctx.method() + " " + ctx.path())));
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
        return worker == null ? 0 : worker.pending();
    }

    private void health(Context ctx) {
        JsonObject o = new JsonObject();
        o.addProperty("status", closing ? "shutting_down" : "ok");
        o.addProperty("model", modelName);
        o.addProperty("pending", pending());
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
