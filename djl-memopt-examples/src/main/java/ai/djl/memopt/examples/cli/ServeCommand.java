package ai.djl.memopt.examples.cli;

import ai.djl.memopt.inference.GenerationModel;
import ai.djl.memopt.inference.server.GenerationServer;
import java.nio.file.Path;
import java.time.Duration;
import java.util.concurrent.Callable;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;

/**
 * {@code memopt serve}: an OpenAI-compatible HTTP server ({@code /v1/completions}, {@code /v1/chat/completions},
 * {@code /health}) over a DeepSeek checkpoint directory, with the compressed MLA cache. Stops gracefully on SIGINT /
 * SIGTERM.
 *
 * <pre>
 * memopt serve --model DIR --port 8080
 * curl -s localhost:8080/v1/completions -d '{"prompt": "Hello", "max_tokens": 16}'
 * </pre>
 */
@Command(name = "serve", mixinStandardHelpOptions = true, description = "Serve a DeepSeek-V2/V3 checkpoint over an OpenAI-compatible HTTP API.")
public final class ServeCommand implements Callable<Integer> {

    /** The running server, for in-process tests to stop it. */
    static volatile GenerationServer running;

    @Option(names = "--model", required = true, paramLabel = "DIR",
            description = "Model directory: a Hugging Face checkpoint (config.json, safetensors) or a quantized artifact")
    Path model;

    @Option(names = "--adapter", paramLabel = "DIR",
            description = "A LoRA adapter (PEFT layout, as memopt finetune --lora-rank writes it) to run on the"
                    + " model, unmerged; on a quantized artifact the base stays quantized.")
    Path adapter;

    @Option(names = "--host", defaultValue = "127.0.0.1", paramLabel = "HOST", description = "interface to bind (default: ${DEFAULT-VALUE})")
    String host;

    @Option(names = "--port", defaultValue = "8080", paramLabel = "PORT", converter = OptionValues.Port.class,
            description = "port, 0 = any free one (default: ${DEFAULT-VALUE})")
    int port;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "default: ${DEFAULT-VALUE}")
    String device;

    @Option(names = "--dtype", defaultValue = "fp32", paramLabel = "fp32|fp16", description = "default: ${DEFAULT-VALUE}")
    String dtype;

    @Option(names = "--max-queue", defaultValue = "16", paramLabel = "N", converter = OptionValues.NonNegative.class,
            description = "requests waiting behind the running one; more get 429 (default: ${DEFAULT-VALUE})")
    int maxQueue;

    @Option(names = {"--max-new-tokens", "--max-tokens"}, defaultValue = "4096", paramLabel = "N",
            converter = OptionValues.Positive.class,
            description = "most tokens one request may generate: larger max_tokens get HTTP 400 (default: ${DEFAULT-VALUE})")
    int maxTokens;

    @Option(names = "--max-body-bytes", defaultValue = "1048576", paramLabel = "N",
            converter = OptionValues.BodyBytes.class, description = "largest request body (default: ${DEFAULT-VALUE})")
    long maxBodyBytes;

    @Option(names = "--shutdown-grace", defaultValue = "30", paramLabel = "SECONDS",
            converter = OptionValues.NonNegative.class, description = "time running requests get to finish on shutdown (default: ${DEFAULT-VALUE})")
    int shutdownGraceSeconds;

    @Option(names = "--max-pending-bytes", defaultValue = "" + GenerationServer.DEFAULT_MAX_PENDING_BYTES, paramLabel = "N",
            description = "estimated memory admitted requests may hold together (tokenizing; then ids, cache for prompt + max_tokens, logits); more get 429 (default: ${DEFAULT-VALUE})")
    long maxPendingBytes;

    @Option(names = "--max-connections", defaultValue = "" + GenerationServer.DEFAULT_MAX_CONNECTIONS, paramLabel = "N",
            description = "open HTTP connections at most (default: ${DEFAULT-VALUE})")
    int maxConnections;

    @Option(names = "--read-timeout", defaultValue = "10", paramLabel = "SECONDS",
            description = "close a connection on which no byte arrives for this long (408 during a body) (default: ${DEFAULT-VALUE})")
    int readTimeoutSeconds;

    @Option(names = "--body-timeout", defaultValue = "30", paramLabel = "SECONDS",
            description = "a request body must arrive within this long (408) (default: ${DEFAULT-VALUE})")
    int bodyTimeoutSeconds;

    @Override
    public Integer call() throws Exception {
        try (GenerationModel m = GenerationModel.open(model, Devices.parse(device), Devices.dtype(dtype), adapter)) {
            GenerationServer server =
                    GenerationServer.builder()
                            .setGenerator(m.generator())
                            .optTokenizer(m.tokenizer().orElse(null))
                            .optModelName(model.toAbsolutePath().normalize().getFileName().toString())
                            .optHost(host)
                            .optPort(port)
                            .optMaxQueue(maxQueue)
                            .optMaxTokens(maxTokens)
                            .optMaxBodyBytes(maxBodyBytes)
                            .optMaxContextLength(m.config().maxPositionEmbeddings())
                            .optShutdownGrace(Duration.ofSeconds(shutdownGraceSeconds))
                            .optMaxPendingBytes(maxPendingBytes)
                            .optMaxConnections(maxConnections)
                            .optReadTimeout(Duration.ofSeconds(readTimeoutSeconds))
                            .optBodyTimeout(Duration.ofSeconds(bodyTimeoutSeconds))
                            .build();
            Thread hook = new Thread(server::close, "memopt-serve-shutdown");
            Runtime.getRuntime().addShutdownHook(hook);
            try {
                server.start();
                running = server;
                System.out.println("memopt serve: listening on http://" + server.host() + ":" + server.port()
                        + " (model " + model + ", cache " + m.decoder().cacheBytesPerToken() + " bytes/token)");
                System.out.flush();
                server.awaitStop();
            } finally {
                running = null;
                server.close();
                try {
                    Runtime.getRuntime().removeShutdownHook(hook);
                } catch (IllegalStateException e) {
                    // the JVM is already shutting down: the hook is running
                }
            }
        }
        return 0;
    }
}
