package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.ndarray.NDManager;
import java.util.List;
import java.util.UUID;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.atomic.AtomicBoolean;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * One request on the generation worker: its result (completed with {@code null} if it was cancelled before it
 * started), the text deltas of a streaming request, and the flag that cancels it before its next decode step.
 */
final class GenerationJob implements Runnable {

    private static final Logger logger = LoggerFactory.getLogger(GenerationJob.class);

    final boolean chat;
    final boolean stream;
    final long[] promptIds;
    final SamplingParams params;
    final String id;
    final long created = System.currentTimeMillis() / 1000;
    final CompletableFuture<GenerationResult> result = new CompletableFuture<>();
    final BlockingQueue<String> deltas = new LinkedBlockingQueue<>();
    private final Generator generator;
    volatile boolean cancelled;
    private final AtomicBoolean clientGone = new AtomicBoolean();

    GenerationJob(boolean chat, boolean stream, long[] promptIds, SamplingParams params, Generator generator) {
        this.chat = chat;
        this.stream = stream;
        this.promptIds = promptIds;
        this.params = params;
        this.generator = generator;
        this.id = (chat ? "chatcmpl-" : "cmpl-") + UUID.randomUUID().toString().replace("-", "");
    }

    /** Notes that the client went away (nothing is answered); true the first time. */
    boolean markClientGone() {
        return clientGone.compareAndSet(false, true);
    }

    /** Whether the client went away. */
    boolean clientGone() {
        return clientGone.get();
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
                            List.of(promptIds),
                            params,
                            stream ? (i, token, delta) -> deltas.add(delta) : null,
                            () -> cancelled);
            result.complete(r.get(0));
        } catch (Throwable t) {
            logger.error("generation failed", t);
            result.completeExceptionally(t);
        }
    }
}
