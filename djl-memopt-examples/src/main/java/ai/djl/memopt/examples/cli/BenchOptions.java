package ai.djl.memopt.examples.cli;

import java.nio.file.Path;
import picocli.CommandLine.Model.CommandSpec;
import picocli.CommandLine.Option;
import picocli.CommandLine.Spec;

/**
 * The options every {@code memopt bench} command shares (a picocli mixin): the worker's heap and time limit,
 * where results are kept, and {@code --json}. Each command makes it with its own defaults, which help shows:
 *
 * <pre>{@code
 * @Mixin BenchOptions bench = new BenchOptions("3g", 3600);
 * }</pre>
 *
 * <p>A command whose measured work runs in its own JVM or in another program makes it with
 * {@link #BenchOptions(long)}: it has no {@code --heap}.
 */
public final class BenchOptions {

    @Option(names = "--heap", paramLabel = "SIZE",
            description = "Java heap of each worker JVM (default ${DEFAULT-VALUE}; the weights live outside it).")
    String heap;

    @Option(names = "--timeout", paramLabel = "SECONDS",
            description = "Time limit of each worker process (default ${DEFAULT-VALUE}).")
    long timeout;

    @Option(names = "--out", paramLabel = "FILE",
            description = "Markdown file whose results table is updated (a row of the same configuration is replaced).")
    Path out;

    @Option(names = "--chart", paramLabel = "FILE.png", description = "Also write a chart (PNG) of the results.")
    Path chart;

    @Option(names = "--json", description = "Accepted for consistency: results are always JSON lines.")
    boolean json;

    /** With the command's default heap (e.g. {@code 3g}) and per-worker time limit in seconds. */
    BenchOptions(String heap, long timeoutSeconds) {
        this.heap = heap;
        this.timeout = timeoutSeconds;
    }

    /** Without {@code --heap}: for a command that starts no worker JVM. */
    BenchOptions(long timeoutSeconds) {
        this(null, timeoutSeconds);
    }

    /** Takes {@code --heap} off a command made with {@link #BenchOptions(long)}. */
    @Spec(Spec.Target.MIXEE)
    void mixee(CommandSpec command) {
        if (heap == null && command.findOption("--heap") != null) {
            command.remove(command.findOption("--heap"));
        }
    }

    /** Rejects a heap that is not a JVM size or a time limit below one second, naming the option. */
    void validate() {
        if (heap != null && !heap.matches("[1-9][0-9]*[kKmMgG]?")) {
            throw new IllegalArgumentException("--heap: expected a JVM heap size such as 512m or 3g, got '" + heap
                    + "'");
        }
        if (timeout < 1) {
            throw new IllegalArgumentException("--timeout must be at least 1 second, got " + timeout);
        }
    }
}
