package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.fail;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Assumptions;

/**
 * The real llama.cpp for tests: node-llama-cpp 3.21.1 (its prebuilt linux-x64 CPU binaries, which bundle llama.cpp
 * release {@code v0.4.0} of its build) installed with {@code npm ci} from the committed
 * {@code src/test/llama-cpp/package-lock.json} into {@code target/llama-cpp} once per build, and
 * {@code llama-check.mjs} run on JSON requests.
 *
 * <p>Without Node.js 18+ and npm (or off linux-x64) the tests that need it <b>fail</b>, saying why, unless
 * {@code -Dmemopt.skipLlamaCpp=true} is given, which skips them with a warning on stderr.
 */
final class LlamaCpp {

    static final Path SOURCE = Path.of("src", "test", "llama-cpp").toAbsolutePath();
    static final Path DIR = Path.of("target", "llama-cpp").toAbsolutePath();
    private static final String SKIP = "memopt.skipLlamaCpp";
    private static String unavailable;
    private static boolean installed;

    private LlamaCpp() {}

    /** Installs node-llama-cpp once (or fails/skips the calling test, see the class comment). */
    static synchronized Path require() {
        if (!installed && unavailable == null) {
            try {
                install();
                installed = true;
            } catch (IOException | InterruptedException e) {
                unavailable = e.getMessage();
            }
        }
        if (unavailable != null) {
            String message = "the real llama.cpp is not available (" + unavailable + "). These checks need Node.js 18+ "
                    + "and npm on linux-x64 with the npm registry reachable (CI has them); pass -D" + SKIP
                    + "=true to skip them knowingly";
            if (Boolean.getBoolean(SKIP)) {
                System.err.println("\n*** WARNING: SKIPPING THE llama.cpp CHECKS: " + message + " ***\n");
                Assumptions.abort("llama.cpp checks skipped (-D" + SKIP + "=true): " + unavailable);
            }
            fail(message);
        }
        return DIR;
    }

    /** The ggml library that node-llama-cpp ships (for calling ggml's own quantizers). */
    static Path ggmlBase() {
        return require().resolve("node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-base.so");
    }

    private static void install() throws IOException, InterruptedException {
        String os = System.getProperty("os.name").toLowerCase(Locale.ROOT);
        String arch = System.getProperty("os.arch");
        if (!os.contains("linux") || !(arch.equals("amd64") || arch.equals("x86_64"))) {
            throw new IOException("node-llama-cpp's CPU binaries here are for linux-x64, this is " + os + "/" + arch);
        }
        String version = run(List.of("node", "--version"), DIR.getParent(), 60).trim();
        int major = Integer.parseInt(version.replaceAll("^v(\\d+).*$", "$1"));
        if (major < 18) {
            throw new IOException("Node.js " + version + " is too old (18+)");
        }
        Files.createDirectories(DIR);
        boolean fresh = Files.isDirectory(DIR.resolve("node_modules/node-llama-cpp"))
                && Files.isRegularFile(DIR.resolve("package-lock.json"))
                && Files.mismatch(DIR.resolve("package-lock.json"), SOURCE.resolve("package-lock.json")) == -1;
        for (String f : new String[] {"package.json", "package-lock.json", "llama-check.mjs"}) {
            Files.copy(SOURCE.resolve(f), DIR.resolve(f), StandardCopyOption.REPLACE_EXISTING);
        }
        if (!fresh) {
            long start = System.nanoTime();
            // the other platforms' binaries are optional dependencies (about 700 MB): only linux-x64 is listed
            // directly; install scripts are not needed with the prebuilt binaries
            run(List.of("npm", "ci", "--omit=optional", "--ignore-scripts", "--no-audit", "--no-fund"), DIR, 600);
            System.err.printf("llama.cpp: npm ci of node-llama-cpp 3.21.1 took %.1f s%n",
                    (System.nanoTime() - start) / 1e9);
        }
    }

    /** Runs the check script on a request {@code {"jobs": [...]}}; returns its {@code results}. */
    static JsonArray check(JsonObject request) throws IOException, InterruptedException {
        Path dir = require();
        long start = System.nanoTime();
        String out = run(List.of("node", "llama-check.mjs"), dir, 600, request.toString());
        System.err.printf("llama.cpp: %d job(s) in %.1f s%n", request.getAsJsonArray("jobs").size(),
                (System.nanoTime() - start) / 1e9);
        String[] lines = out.trim().split("\n");
        return JsonParser.parseString(lines[lines.length - 1]).getAsJsonObject().getAsJsonArray("results");
    }

    /** One job: a model and what to compute. */
    static JsonObject job(Path model) {
        JsonObject j = new JsonObject();
        j.addProperty("model", model.toAbsolutePath().toString());
        return j;
    }

    static JsonArray ids(long... ids) {
        JsonArray a = new JsonArray();
        for (long id : ids) {
            a.add(id);
        }
        return a;
    }

    static long[] longs(JsonArray a) {
        long[] out = new long[a.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = a.get(i).getAsLong();
        }
        return out;
    }

    private static String run(List<String> command, Path dir, int timeoutSeconds) throws IOException,
            InterruptedException {
        return run(command, dir, timeoutSeconds, null);
    }

    private static String run(List<String> command, Path dir, int timeoutSeconds, String stdin) throws IOException,
            InterruptedException {
        Path log = Files.createTempFile("llama-cpp-", ".log");
        try {
            ProcessBuilder pb = new ProcessBuilder(new ArrayList<>(command)).directory(dir.toFile())
                    .redirectErrorStream(false).redirectError(log.toFile());
            Process p;
            try {
                p = pb.start();
            } catch (IOException e) {
                throw new IOException("cannot run '" + String.join(" ", command) + "': " + e.getMessage(), e);
            }
            try (OutputStream os = p.getOutputStream()) {
                if (stdin != null) {
                    os.write(stdin.getBytes(StandardCharsets.UTF_8));
                }
            }
            byte[] out = p.getInputStream().readAllBytes();
            if (!p.waitFor(timeoutSeconds, TimeUnit.SECONDS)) {
                p.destroyForcibly();
                throw new IOException("'" + String.join(" ", command) + "' timed out after " + timeoutSeconds + " s");
            }
            if (p.exitValue() != 0) {
                String err = Files.readString(log);
                throw new IOException("'" + String.join(" ", command) + "' exited with " + p.exitValue() + ": "
                        + err.substring(Math.max(0, err.length() - 2000)));
            }
            return new String(out, StandardCharsets.UTF_8);
        } finally {
            Files.deleteIfExists(log);
        }
    }
}
