package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.examples.bench.FreshJvm;
import ai.djl.memopt.examples.bench.GgufBenchWorker;
import ai.djl.memopt.examples.bench.MarkdownTable;
import ai.djl.memopt.gguf.GgmlType;
import ai.djl.memopt.gguf.GgufExporter;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.LocalDate;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.Callable;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;

/**
 * {@code memopt bench gguf}: CPU decoding speed of our engine against the real llama.cpp on the same GGUF files, in
 * the same run: a preset with seeded random weights exported to each type, then for each type our engine
 * ({@link GgufBenchWorker} in a fresh JVM, the file loaded as {@code --model FILE.gguf} loads it) and llama.cpp
 * (node-llama-cpp 3.21.1's {@code llama-check.mjs} bench job) back to back, batch 1, the same prompt ids, the same
 * thread count; one JSON line per engine and type. Tokens per second count the {@code newTokens - 1} single-token
 * decode steps after the prompt, on both sides.
 *
 * <p>llama.cpp comes from a directory where node-llama-cpp is installed with the check script: the test suite leaves
 * one in {@code djl-memopt-examples/target/llama-cpp} ({@code npm ci} of {@code src/test/llama-cpp}).
 *
 * <pre>
 * memopt bench gguf --preset bench-small --types f32,q8_0,q4_0 --prompt-tokens 512 --max-new-tokens 128 \
 *     --out docs/benchmarks.md
 * </pre>
 */
@Command(name = "gguf", mixinStandardHelpOptions = true,
        description = "CPU decoding speed, ours against llama.cpp (node-llama-cpp 3.21.1), on the same GGUF files.")
public final class BenchGgufCommand implements Callable<Integer> {

    static final String TABLE = "bench-gguf";
    static final List<String> HEADER = List.of("preset", "type", "prompt", "new", "threads", "ours tok/s",
            "llama.cpp tok/s", "ours / llama.cpp", "ours prefill s", "llama.cpp prefill s", "file MB", "date");
    static final List<String> ALIGN = List.of("---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:",
            "---:", "---:", "---");

    @Option(names = "--preset", defaultValue = "bench-small", paramLabel = "NAME",
            description = "Model preset with seeded random weights (default bench-small).")
    String preset;

    @Option(names = "--types", split = ",", paramLabel = "T", defaultValue = "f32,q8_0,q4_0",
            description = "GGUF types (default f32,q8_0,q4_0).")
    List<String> types;

    @Option(names = "--prompt-tokens", defaultValue = "512", paramLabel = "P", description = "Prompt length.")
    int promptTokens;

    @Option(names = {"--max-new-tokens", "--new-tokens"}, defaultValue = "128", paramLabel = "N",
            description = "Tokens generated.")
    int newTokens;

    @Option(names = "--threads", defaultValue = "1", paramLabel = "N",
            description = "CPU threads of both engines (default 1: steadier on a shared machine).")
    int threads;

    @Option(names = "--llama-cpp", defaultValue = "djl-memopt-examples/target/llama-cpp", paramLabel = "DIR",
            description = "Directory with node_modules/node-llama-cpp and llama-check.mjs.")
    Path llamaCpp;

    @Option(names = "--work", paramLabel = "DIR", description = "Where the GGUF files go (default: a temporary "
            + "directory, deleted afterwards).")
    Path work;

    @Option(names = "--seed", defaultValue = "42", paramLabel = "S", description = "Weights and prompt seed.")
    long seed;

    @Option(names = "--heap", defaultValue = "6g", paramLabel = "SIZE", description = "Worker -Xmx (default 6g).")
    String heap;

    @Option(names = "--timeout", defaultValue = "3600", paramLabel = "SECONDS", description = "Per-run time limit.")
    long timeout;

    @Option(names = "--out", paramLabel = "FILE", description = "Markdown file whose results table is updated.")
    Path out;

    @Option(names = "--profile", description = "Also profile a few of our decode steps with PyTorch's profiler "
            + "(operator self time per step, in our JSON line).")
    boolean profile;

    @Override
    public Integer call() throws Exception {
        DeepSeekConfig config = DeepSeekConfig.preset(preset);
        List<GgmlType> selected = new ArrayList<>();
        for (String t : types) {
            selected.add(GgufCommand.parseType(t.trim()));
        }
        if (promptTokens < 1 || newTokens < 2 || threads < 1) {
            throw new IllegalArgumentException("need --prompt-tokens >= 1, --max-new-tokens >= 2, --threads >= 1");
        }
        new LlamaCppScript(llamaCpp, timeout); // checks the install before any heavy work
        boolean temporary = work == null;
        Path dir = temporary ? Files.createTempDirectory("memopt-bench-gguf-") : Files.createDirectories(work);
        String previous = System.setProperty("ai.djl.pytorch.num_threads", Integer.toString(threads));
        try {
            List<List<String>> rows = new ArrayList<>();
            for (GgmlType t : selected) {
                Path file = dir.resolve(preset + "-" + t.name().toLowerCase(Locale.ROOT) + ".gguf");
                try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(config, seed, Device.cpu(),
                        DataType.FLOAT32)) {
                    GgufExporter.export(lm, null, t, file, null);
                }
                List<String> jvm = new ArrayList<>(List.of("-Xmx" + heap));
                if (profile) {
                    jvm.add("-Dmemopt.bench.profile=true");
                }
                JsonObject ours = BenchGenerateCommand.lastJson(FreshJvm.run(jvm, Map.of(), timeout,
                        GgufBenchWorker.class, List.of(file.toString(), Integer.toString(promptTokens),
                                Integer.toString(newTokens), Long.toString(seed))), "djl-memopt " + t);
                ours.addProperty("preset", preset);
                ours.addProperty("type", t.name());
                System.out.println(ours);
                JsonObject theirs = llamaCpp(file, GgufBenchWorker.promptIds(seed, promptTokens, config.vocabSize()));
                theirs.addProperty("preset", preset);
                theirs.addProperty("type", t.name());
                System.out.println(theirs);
                System.out.flush();
                double a = ours.get("tokens_per_second").getAsDouble();
                double b = theirs.get("tokens_per_second").getAsDouble();
                rows.add(List.of(preset, t.name(), Integer.toString(promptTokens), Integer.toString(newTokens),
                        Integer.toString(threads), String.format(Locale.ROOT, "%.1f", a),
                        String.format(Locale.ROOT, "%.1f", b), String.format(Locale.ROOT, "%.2fx", a / b),
                        String.format(Locale.ROOT, "%.2f", ours.get("prefill_seconds").getAsDouble()),
                        String.format(Locale.ROOT, "%.2f", theirs.get("prefill_seconds").getAsDouble()),
                        String.format(Locale.ROOT, "%.0f", Files.size(file) / 1e6),
                        LocalDate.now(ZoneOffset.UTC).toString()));
                if (temporary) {
                    Files.delete(file);
                }
            }
            if (out != null) {
                MarkdownTable.update(out, TABLE, HEADER, ALIGN, 5, rows);
            }
        } finally {
            if (previous == null) {
                System.clearProperty("ai.djl.pytorch.num_threads");
            } else {
                System.setProperty("ai.djl.pytorch.num_threads", previous);
            }
            if (temporary) {
                Files.deleteIfExists(dir);
            }
        }
        return 0;
    }

    private JsonObject llamaCpp(Path file, long[] prompt) throws IOException, InterruptedException {
        JsonObject job = new JsonObject();
        job.addProperty("model", file.toAbsolutePath().toString());
        job.addProperty("contextSize", promptTokens + newTokens + 16);
        job.addProperty("threads", threads);
        JsonObject bench = new JsonObject();
        bench.add("prompt", LlamaCppScript.ids(prompt));
        bench.addProperty("newTokens", newTokens);
        job.add("bench", bench);
        JsonObject r = new LlamaCppScript(llamaCpp, timeout).run(job).getAsJsonObject("bench");
        JsonObject o = new JsonObject();
        o.addProperty("engine", "llama.cpp (node-llama-cpp 3.21.1)");
        o.addProperty("model", file.toString());
        o.addProperty("prompt_tokens", promptTokens);
        o.addProperty("new_tokens", newTokens);
        o.addProperty("threads", threads);
        o.addProperty("prefill_seconds", r.get("promptSeconds").getAsDouble());
        o.addProperty("decode_seconds", r.get("decodeSeconds").getAsDouble());
        o.addProperty("tokens_per_second", (newTokens - 1) / r.get("decodeSeconds").getAsDouble());
        return o;
    }
}
