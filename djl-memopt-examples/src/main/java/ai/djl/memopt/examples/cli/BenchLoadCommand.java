package ai.djl.memopt.examples.cli;

import ai.djl.memopt.examples.bench.BarChart;
import ai.djl.memopt.examples.bench.FreshJvm;
import ai.djl.memopt.examples.bench.LoadBenchWorker;
import ai.djl.memopt.examples.bench.MarkdownTable;
import ai.djl.memopt.examples.bench.SyntheticCheckpoint;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.ndarray.types.Shape;
import com.google.gson.JsonObject;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.LocalDate;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.Callable;
import picocli.CommandLine.Command;
import picocli.CommandLine.Mixin;
import picocli.CommandLine.Option;
import org.jfree.data.category.DefaultCategoryDataset;

/**
 * {@code memopt bench load}: host memory and time of loading a Hugging Face DeepSeek directory as int4 or int8 with
 * the streaming quantized loader, in a fresh JVM ({@link LoadBenchWorker}); one JSON line per scheme.
 *
 * <p>With {@code --synthesize PRESET}, a BF16 checkpoint of that preset with seeded random weights
 * ({@link SyntheticCheckpoint}) is written into {@code --model DIR} first, unless the directory already holds a
 * complete one ({@code config.json} and the shard index, written last). DeepSeek-V2-Lite is about 31 GB:
 *
 * <pre>
 * memopt bench load --model /data/v2-lite-bf16 --synthesize deepseek-v2-lite --scheme int4,int8
 * </pre>
 *
 * <p>Fields: see {@link LoadBenchWorker}; {@code peak} is the worker's VmHWM after the load, to compare with
 * {@code quantized_bytes + float_bytes + largest_tensor_bytes}. {@code --out FILE} keeps a markdown table between
 * {@code <!-- bench-load:begin -->} and {@code <!-- bench-load:end -->}; {@code --chart} draws peak RSS, model and
 * checkpoint bytes per scheme.
 */
@Command(name = "load", mixinStandardHelpOptions = true,
        description = "Peak host memory and time of a streaming int4/int8 load of a Hugging Face directory, in a fresh"
                + " JVM (optionally writing a synthetic BF16 checkpoint of a preset first).")
public final class BenchLoadCommand implements Callable<Integer> {

    @Option(names = "--model", required = true, paramLabel = "DIR",
            description = "Hugging Face DeepSeek directory (F32, F16 or BF16 safetensors).")
    Path model;

    @Option(names = "--synthesize", paramLabel = "PRESET",
            description = "First write a BF16 checkpoint of this preset with random weights into --model (skipped if"
                    + " one is complete there).")
    String synthesize;

    @Option(names = "--layers", paramLabel = "N",
            description = "Synthesize only the first N decoder layers of the preset (same widths), e.g. to measure"
                    + " per-layer costs of a model too large to train here.")
    Integer layers;

    @Option(names = "--shard-size", defaultValue = "4", paramLabel = "GiB",
            description = "Largest shard of a synthesized checkpoint in GiB (default 4).")
    int shardGiB;

    @Option(names = "--scheme", split = ",", defaultValue = "int4", paramLabel = "int4|int8",
            description = "Schemes to load with (comma list, default int4).")
    List<String> schemes;

    @Option(names = "--group-size", defaultValue = "128", paramLabel = "N", description = "int4 group size (default 128).")
    int groupSize;

    @Option(names = "--dtype", defaultValue = "fp32", paramLabel = "fp32|fp16",
            description = "Type of the weights kept in float and of activations (default fp32).")
    String dtype;

    @Option(names = "--forward-tokens", defaultValue = "8", paramLabel = "N",
            description = "Tokens of the forward pass run after loading (0: none; default 8).")
    int forwardTokens;

    @Option(names = "--synthesize-only", description = "Only write the --synthesize checkpoint; do not load it.")
    boolean synthesizeOnly;

    @Option(names = "--seed", defaultValue = "42", paramLabel = "S", description = "Synthetic weights seed.")
    long seed;

    @Mixin BenchOptions bench = new BenchOptions("2g", 7200);

    @Override
    public Integer call() throws Exception {
        bench.validate();
        for (String s : schemes) {
            if (!s.equals("int4") && !s.equals("int8")) {
                throw new IllegalArgumentException("--scheme: '" + s + "' is not int4 or int8");
            }
        }
        if (!dtype.equals("fp32") && !dtype.equals("fp16")) {
            throw new IllegalArgumentException("--dtype: '" + dtype + "' is not fp32 or fp16");
        }
        if (shardGiB < 1) {
            throw new IllegalArgumentException("--shard-size must be at least 1 GiB, got " + shardGiB);
        }
        if (synthesize != null) {
            DeepSeekConfig config = DeepSeekConfig.preset(synthesize);
            if (layers != null) {
                if (layers < 1 || layers > config.numHiddenLayers()) {
                    throw new IllegalArgumentException("--layers must be 1.." + config.numHiddenLayers() + ", got "
                            + layers);
                }
                config = config.toBuilder().numHiddenLayers(layers).build();
            }
            if (Files.isRegularFile(model.resolve("config.json"))
                    && Files.isRegularFile(model.resolve(HfCheckpoint.INDEX_FILE))) {
                System.err.println("memopt bench load: " + model + " already holds a checkpoint; not rewriting it");
            } else {
                long total = 2 * SyntheticCheckpoint.tensorShapes(config).values().stream().mapToLong(Shape::size).sum();
                ProgressBar bar = new ProgressBar(System.err, "synthesize " + synthesize, total);
                long[] shown = {0};
                long start = System.nanoTime();
                SyntheticCheckpoint.Summary s = SyntheticCheckpoint.write(config, model, seed,
                        (long) shardGiB << 30, done -> {
                            if (done - shown[0] >= total / 200 || done == total) { // a redraw per 0.5%
                                shown[0] = done;
                                bar.update(done, String.format(Locale.ROOT, "%.1f GB", done / 1e9));
                            }
                        });
                bar.finish();
                JsonObject o = new JsonObject();
                o.addProperty("synthesized", synthesize);
                o.addProperty("dir", model.toString());
                o.addProperty("parameters", s.parameters());
                o.addProperty("tensor_bytes", s.bytes());
                o.addProperty("shards", s.shards());
                o.addProperty("largest_tensor", s.largestTensor());
                o.addProperty("largest_tensor_bytes", s.largestTensorBytes());
                o.addProperty("seconds", (System.nanoTime() - start) / 1e9);
                System.out.println(o);
            }
        }
        if (synthesizeOnly) {
            return 0;
        }
        if (!Files.isRegularFile(model.resolve("config.json"))) {
            throw new IllegalArgumentException("--model " + model + " has no config.json");
        }
        List<JsonObject> results = new ArrayList<>();
        for (String scheme : schemes) {
            List<String> lines = FreshJvm.run(List.of("-Xmx" + bench.heap), BenchTrainCommand.ALLOCATOR, bench.timeout,
                    LoadBenchWorker.class, List.of(model.toString(), scheme, String.valueOf(groupSize), dtype,
                            String.valueOf(forwardTokens)));
            JsonObject result = BenchGenerateCommand.lastJson(lines, scheme);
            System.out.println(result);
            System.err.println(String.format(Locale.ROOT,
                    "memopt bench load: %s: peak RSS %.2f GiB (model %.2f GiB, largest tensor %.2f GiB), %.0f s",
                    scheme, gib(result, "peak"), gib(result, "model_bytes"), gib(result, "largest_tensor_bytes"),
                    result.get("load_seconds").getAsDouble()));
            results.add(result);
        }
        String name = model.toAbsolutePath().normalize().getFileName().toString();
        if (bench.chart != null) {
            DefaultCategoryDataset data = new DefaultCategoryDataset();
            for (JsonObject r : results) {
                String scheme = r.get("scheme").getAsString();
                data.addValue(gib(r, "peak"), "peak RSS", scheme);
                data.addValue(gib(r, "model_bytes"), "model in memory", scheme);
                data.addValue(gib(r, "checkpoint_bytes"), "checkpoint on disk", scheme);
            }
            BarChart.write(bench.chart, "Streaming quantized load of " + name, "scheme", "GiB", data);
        }
        if (bench.out != null) {
            List<List<String>> rows = new ArrayList<>();
            String date = LocalDate.now(ZoneOffset.UTC).toString();
            for (JsonObject r : results) {
                rows.add(List.of(name, r.get("scheme").getAsString(), r.get("group_size").getAsString(),
                        r.get("dtype").getAsString(), String.format(Locale.ROOT, "%.2f", gib(r, "checkpoint_bytes")),
                        String.format(Locale.ROOT, "%.2f", gib(r, "model_bytes")),
                        String.format(Locale.ROOT, "%.2f", gib(r, "peak")),
                        String.format(Locale.ROOT, "%.2f", gib(r, "largest_tensor_bytes")),
                        String.format(Locale.ROOT, "%.0f", r.get("load_seconds").getAsDouble()), date));
            }
            MarkdownTable.update(bench.out, TABLE, HEADER, ALIGN, KEY_COLUMNS, rows);
        }
        return 0;
    }

    static final String TABLE = "bench-load";
    static final List<String> HEADER = List.of("model", "scheme", "group", "dtype", "checkpoint GiB", "model GiB",
            "peak RSS GiB", "largest tensor GiB", "load s", "date");
    static final List<String> ALIGN = List.of("---", "---", "---:", "---", "---:", "---:", "---:", "---:", "---:",
            "---");
    /** model, scheme, group and dtype identify a configuration. */
    static final int KEY_COLUMNS = 4;

    private static double gib(JsonObject o, String field) {
        return o.get(field).getAsLong() / (double) (1L << 30);
    }
}
