package ai.djl.memopt.examples.cli;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;

/**
 * Runs {@code memopt} in a fresh JVM with the test class path, so that a native crash or a
 * {@link ai.djl.memopt.safetensors.CrashPoints crash point} ends that JVM and fails the test instead of the suite.
 * The JVM reports a native crash within seconds (not its default two minutes), into {@code work}.
 */
final class ForkedCli {

    /** The exit code (-1 when killed for running past its time) and stdout and stderr together. */
    record Result(int exitCode, String output) {}

    private ForkedCli() {}

    static Result run(Path work, List<String> jvmOptions, List<String> args) throws IOException, InterruptedException {
        List<String> command = new ArrayList<>(List.of(
                Path.of(System.getProperty("java.home"), "bin", "java").toString(), "-Xmx1g",
                "-Dai.djl.offline=true", "-Dai.djl.pytorch.num_threads=1", "-Dai.djl.pytorch.num_interop_threads=1",
                "-XX:ErrorLogTimeout=5", "-XX:-CreateCoredumpOnCrash",
                "-XX:ErrorFile=" + work.resolve("hs_err_%p.log")));
        command.addAll(jvmOptions);
        command.addAll(List.of("-cp", System.getProperty("java.class.path"), MemoptCli.class.getName()));
        command.addAll(args);
        Path log = Files.createTempFile(work, "memopt-", ".log");
        Process p = new ProcessBuilder(command).redirectErrorStream(true).redirectOutput(log.toFile()).start();
        Duration limit = Duration.ofMinutes(5);
        int code = p.waitFor(limit.toSeconds(), TimeUnit.SECONDS) ? p.exitValue() : -1;
        if (code == -1) {
            p.destroyForcibly().waitFor();
        }
        return new Result(code, Files.readString(log, StandardCharsets.UTF_8));
    }
}
