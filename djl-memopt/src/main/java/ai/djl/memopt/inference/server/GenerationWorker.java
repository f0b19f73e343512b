package ai.djl.memopt.inference.server;

import java.util.Set;
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.RejectedExecutionException;
import java.util.concurrent.SynchronousQueue;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/** The one thread that runs the model, and the bounded queue of jobs waiting for it. */
final class GenerationWorker {

    private static final Logger logger = LoggerFactory.getLogger(GenerationWorker.class);

    private final int maxQueue;
    private final ThreadPoolExecutor executor;
    /** Jobs waiting or running, and those whose response is still being written. */
    private final Set<GenerationJob> jobs = ConcurrentHashMap.newKeySet();

    GenerationWorker(int maxQueue) {
        this.maxQueue = maxQueue;
        BlockingQueue<Runnable> queue = maxQueue == 0 ? new SynchronousQueue<>() : new ArrayBlockingQueue<>(maxQueue);
        executor =
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
    }

    /**
     * Queues a job; {@link #done} must follow once its response is written.
     *
     * @throws ApiException 429 when the queue is full, 503 when shutting down
     */
    void submit(GenerationJob job) {
        jobs.add(job);
        try {
            executor.execute(job);
        } catch (RejectedExecutionException e) {
            jobs.remove(job);
            if (executor.isShutdown()) {
                throw ApiException.shuttingDown();
            }
            throw ApiException.busy("the server is busy: " + maxQueue + " requests are already waiting");
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
