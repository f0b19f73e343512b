package ai.djl.memopt.examples.bench;

import com.google.common.base.Preconditions;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

/**
 * Runs a main class in a new JVM with this process's class path, so that each benchmark configuration starts with a
 * clean heap, a clean native allocator and its own peak-RSS counter ({@code VmHWM} cannot be reset in-process).
 */
public final class FreshJvm {

    private FreshJvm() {}

    /**
     * Runs {@code mainClass args...} in a fresh JVM, forwarding its stderr, and returns its stdout lines.
     *
     * @param heap the child's -Xmx (e.g. "4g")
     * @param timeoutSeconds the child is killed after this long
     * @throws IOException if the child fails, times out, or cannot be started
     */
    public static List<String> run(String heap, long timeoutSeconds, Class<?> mainClass, List<String> args)
            throws IOException {
        return run(List.of("-Xmx" + heap), Map.of(), timeoutSeconds, mainClass, args);
    }

    /**
     * As {@link #run(String, long, Class, List)} with extra environment variables for the child (e.g. allocator
     * settings that make its resident set follow the memory it really uses).
     */
    public static List<String> run(String heap, long timeoutSeconds, Class<?> mainClass, List<String> args,
            Map<String, String> environment) throws IOException {
        return run(List.of("-Xmx" + heap), environment, timeoutSeconds, mainClass, args);
    }

    /**
     * Runs {@code mainClass args...} in a fresh JVM with the given JVM options (e.g. {@code -Xmx1g}) and extra
     * environment variables (e.g. glibc's {@code MALLOC_*} tunables), forwarding its stderr; returns its stdout lines.
     *
     * @throws IOException if the child fails, times out, or cannot be started
     */
    public static List<String> run(List<String> jvmOptions, Map<String, String> env, long timeoutSeconds,
            Class<?> mainClass, List<String> args) throws IOException {
        Preconditions.checkArgument(timeoutSeconds > 0, "timeoutSeconds %s", timeoutSeconds);
        String java = Path.of(System.getProperty("java.home"), "bin", "java").toString();
        List<String> command = new ArrayList<>();
        command.add(java);
        command.addAll(jvmOptions);
        command.add("-Dai.djl.offline=" + System.getProperty("ai.djl.offline", "true"));
        // the child computes like the parent: same engine settings (threads, offline, library path)
        for (String name : System.getProperties().stringPropertyNames()) {
            if (name.startsWith("ai.djl.") && !name.equals("ai.djl.offline")) {
                command.add("-D" + name + "=" + System.getProperty(name));
            }
        }
        command.add("-cp");
        command.add(System.getProperty("java.class.path"));
        command.add(mainClass.getName());
        command.addAll(args);
        ProcessBuilder builder = new ProcessBuilder(command).redirectError(ProcessBuilder.Redirect.INHERIT);
        // libtorch's C++ deprecation warnings (printed once per process) would interleave with progress bars
        builder.environment().putIfAbsent("TORCH_CPP_LOG_LEVEL", "ERROR");
        builder.environment().putAll(env);
        Process process = builder.start();
        List<String> lines = new ArrayList<>();
        Thread reader = new Thread(() -> {
            try (BufferedReader r = new BufferedReader(
                    new InputStreamReader(process.getInputStream(), StandardCharsets.UTF_8))) {
                String line;
                while ((line = r.readLine()) != null) {
                    synchronized (lines) {
                        lines.add(line);
                    }
                }
            } catch (IOException ignored) {
                // the process died: its exit code says so below
            }
        }, "fresh-jvm-stdout");
        reader.start();
        try {
            if (!process.waitFor(timeoutSeconds, TimeUnit.SECONDS)) {
                process.destroyForcibly();
                throw new IOException(mainClass.getSimpleName() + " " + args + " timed out after "
                        + timeoutSeconds + " s");
            }
            reader.join(10_000);
        } catch (InterruptedException e) {
            process.destroyForcibly();
            Thread.currentThread().interrupt();
            throw new IOException("interrupted while waiting for " + mainClass.getSimpleName(), e);
        }
        if (process.exitValue() != 0) {
            throw new IOException(mainClass.getSimpleName() + " " + args + " exited with code "
                    + process.exitValue());
        }
        synchronized (lines) {
            return List.copyOf(lines);
        }
    }
}
