package ai.djl.memopt.testing;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;

/**
 * Runs a {@code main} class in a fresh JVM with the test class path, so that a crash (a native abort, a
 * {@link ai.djl.memopt.safetensors.CrashPoints crash point}, a hang) fails the test instead of killing the suite.
 *
 * <pre>{@code
 * ForkedJvm.Result r = ForkedJvm.run(MyMain.class, List.of("-Dmemopt.crashAt=replace-directory.ready"),
 *         List.of(dir.toString()), Duration.ofMinutes(2));
 * assertEquals(137, r.exitCode(), r.output());
 * }</pre>
 */
public final class ForkedJvm {

    /** How a forked JVM ended: its exit code (-1 if it was killed for running past its time) and its output. */
    public record Result(int exitCode, String output) {}

    private ForkedJvm() {}

    /** Runs {@code mainClass} with {@code jvmArgs} and {@code args}; stdout and stderr together in the result. */
    public static Result run(Class<?> mainClass, List<String> jvmArgs, List<String> args, java.time.Duration timeout)
            throws IOException, InterruptedException {
        List<String> cmd = new ArrayList<>();
        cmd.add(Path.of(System.getProperty("java.home"), "bin", "java").toString());
        cmd.add("-Dai.djl.offline=true");
        cmd.add("-Dai.djl.pytorch.num_threads=1");
        cmd.add("-Dai.djl.pytorch.num_interop_threads=1");
        cmd.add("-Xmx1g");
        cmd.addAll(jvmArgs);
        cmd.add("-cp");
        cmd.add(System.getProperty("java.class.path"));
        cmd.add(mainClass.getName());
        cmd.addAll(args);
        Process p = new ProcessBuilder(cmd).redirectErrorStream(true).start();
        byte[][] out = new byte[1][];
        Thread reader = new Thread(() -> {
            try {
                out[0] = p.getInputStream().readAllBytes();
            } catch (IOException e) {
                out[0] = ("(output unreadable: " + e + ")").getBytes(StandardCharsets.UTF_8);
            }
        });
        reader.start();
        if (!p.waitFor(timeout.toMillis(), TimeUnit.MILLISECONDS)) {
            p.destroyForcibly().waitFor();
            reader.join();
            return new Result(-1, new String(out[0], StandardCharsets.UTF_8) + "\n(killed after " + timeout + ")");
        }
        reader.join();
        return new Result(p.exitValue(), new String(out[0], StandardCharsets.UTF_8));
    }
}
