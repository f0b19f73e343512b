package ai.djl.memopt.examples.cli;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.concurrent.TimeUnit;

/**
 * Runs {@code llama-check.mjs} (node-llama-cpp 3.21.1, the real llama.cpp) from a directory where it is installed with
 * its {@code node_modules}: the test suite leaves one in {@code djl-memopt-examples/target/llama-cpp}
 * ({@code npm ci} of {@code djl-memopt-examples/src/test/llama-cpp}).
 */
final class LlamaCppScript {

    private final Path dir;
    private final long timeoutSeconds;

    LlamaCppScript(Path dir, long timeoutSeconds) {
        if (!Files.isRegularFile(dir.resolve("llama-check.mjs"))
                || !Files.isDirectory(dir.resolve("node_modules/node-llama-cpp"))) {
            throw new IllegalArgumentException("--llama-cpp " + dir + " has no node-llama-cpp install with "
                    + "llama-check.mjs: run the test suite (mvn verify) once, or npm ci in a copy of "
                    + "djl-memopt-examples/src/test/llama-cpp");
        }
        this.dir = dir;
        this.timeoutSeconds = timeoutSeconds;
    }

    /** One job's result (see the script's header for the request and result fields). */
    JsonObject run(JsonObject job) throws IOException, InterruptedException {
        JsonArray jobs = new JsonArray();
        jobs.add(job);
        JsonObject request = new JsonObject();
        request.add("jobs", jobs);
        Process p = new ProcessBuilder("node", "llama-check.mjs").directory(dir.toFile())
                .redirectError(ProcessBuilder.Redirect.INHERIT).start();
        try (OutputStream os = p.getOutputStream()) {
            os.write(request.toString().getBytes(StandardCharsets.UTF_8));
        }
        String stdout = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8).trim();
        if (!p.waitFor(timeoutSeconds, TimeUnit.SECONDS)) {
            p.destroyForcibly();
            throw new IOException("llama.cpp on " + job.get("model") + " timed out after " + timeoutSeconds + " s");
        }
        if (p.exitValue() != 0) {
            throw new IOException("llama.cpp on " + job.get("model") + " failed (exit " + p.exitValue() + ")");
        }
        String[] lines = stdout.split("\n");
        return JsonParser.parseString(lines[lines.length - 1]).getAsJsonObject().getAsJsonArray("results").get(0)
                .getAsJsonObject();
    }

    static JsonArray ids(long[] ids) {
        JsonArray a = new JsonArray();
        for (long id : ids) {
            a.add(id);
        }
        return a;
    }
}
