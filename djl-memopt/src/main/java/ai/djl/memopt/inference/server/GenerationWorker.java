package ai.djl.memopt.inference.server;

import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.RejectedExecutionException;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The one thread that runs the model and the jobs waiting for it, in order. How many may wait is {@link Admission}'s
 * business: the queue here takes every admitted job.
 */
final class GenerationWorker {

    private static final Logger logger = LoggerFactory.getLogger(GenerationWorker.class);

    private final ThreadPoolExecutor executor;
    /** Jobs queued or running, and those whose response is still being written. */
    private final Set<GenerationJob> jobs = ConcurrentHashMap.newKeySet();

    GenerationWorker() {
        executor =
                new ThreadPoolExecutor(
                        1,
                        1,
                        0,
                        TimeUnit.MILLISECONDS,
                        new LinkedBlockingQueue<>(),
                        r -> {
                            Thread t = new Thread(r, "memopt-generation-worker");
                            t.setDaemon(true);
                            return t;
                        },
                        new ThreadPoolExecutor.AbortPolicy());
    }

    /**
     * Queues a job; {@link #done} must follow once its response is written.
     *
     * @throws ApiException 503 when shutting down
     */
    void submit(GenerationJob job) {
        jobs.add(job);
        try {
            executor.execute(job);
        } catch (RejectedExecutionException e) {
            jobs.remove(job);
            throw ApiException.shuttingDown();
        }
    }

    /**
     * Cancels a job whose client went away: a queued one leaves the queue at once (its result is {@code null}), a
     * running one stops before its next decode step.
     */
    void cancel(GenerationJob job) {
        job.cancelled = true;
        if (executor.remove(job)) {
            job.result.complete(null);
        }
    }

    void done(GenerationJob job) {
        jobs.remove(job);
    }

    int pending() {
        return jobs.size();
    }

    /**
     * Stops taking jobs and lets the running and queued ones finish within {@code graceMillis}, then cancels the rest
     * (a queued job that never started completes with {@code null}).
     */
    void shutdown(long graceMillis) throws InterruptedException {
        executor.shutdown();
        if (!executor.awaitTermination(graceMillis, TimeUnit.MILLISECONDS)) {
            logger.info("cancelling {} request(s) still running after {} ms", jobs.size(), graceMillis);
            for (GenerationJob j : jobs) {
                j.cancelled = true;
            }
            if (!executor.awaitTermination(60, TimeUnit.SECONDS)) {
                logger.warn("the generation worker did not stop within 60 s");
                executor.shutdownNow();
            }
        }
    }
}
