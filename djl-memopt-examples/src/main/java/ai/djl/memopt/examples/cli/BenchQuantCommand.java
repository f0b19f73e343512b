package ai.djl.memopt.examples.cli;

import ai.djl.memopt.examples.bench.BarChart;
import ai.djl.memopt.examples.bench.FreshJvm;
import ai.djl.memopt.examples.bench.MarkdownTable;
import ai.djl.memopt.examples.bench.QuantBenchWorker;
import ai.djl.memopt.safetensors.AtomicFiles;
import com.google.gson.JsonObject;
import java.nio.file.Files;
import org.jfree.data.category.DefaultCategoryDataset;
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

/**
 * {@code memopt bench quant}: held-out perplexity and weight size of a model quantized several ways, each variant in a
 * fresh JVM running {@link QuantBenchWorker}; one JSON line per variant, with ratios to the FP32 baseline.
 *
 * <p>Variants (default: all that the options allow): {@code fp32} (always run first: the baseline), {@code int8}
 * (per-channel RTN), {@code int4} (group-wise RTN; the quantizer falls back to a smaller group for layers the group
 * size does not divide), {@code int4-awq} and {@code int4-gptq} (need {@code --calibration}).
 *
 * <p>{@code --include-embeddings} quantizes the token embedding table too ({@code embeddings} field and "embed"
 * column: its scheme, or {@code fp32}).
 *
 * <p>Fields: {@code perplexity}, {@code loss}, {@code weight_bytes} (arrays held in memory after quantization),
 * {@code weight_ratio} (to FP32), {@code quantized_layers_ratio} (bytes of the quantized layers only, after/before),
 * {@code artifact_bytes} (weight files on disk), {@code perplexity_change} (relative to FP32), and the configuration.
 * {@code --out FILE} keeps a markdown table between {@code <!-- bench-quant:begin -->} and
 * {@code <!-- bench-quant:end -->}.
 *
 * <pre>
 * memopt bench quant --model sotu-tiny --held-out heldout.txt --calibration calib.txt --out docs/benchmarks.md
 * </pre>
 */
@Command(name = "quant", mixinStandardHelpOptions = true,
        description = "Held-out perplexity and weight bytes of FP32, int8, int4 RTN and int4 AWQ/GPTQ, each in a fresh"
                + " JVM.")
public final class BenchQuantCommand implements Callable<Integer> {

    static final String TABLE = "bench-quant";
    static final List<String> HEADER = List.of("model", "variant", "lm_head", "embed", "group", "seq", "perplexity",
            "vs fp32", "weight MB", "weight ratio", "quantized layers ratio", "artifact MB", "quantize s", "date");
    static final List<String> ALIGN = List.of("---", "---", "---", "---", "---:", "---:", "---:", "---:", "---:",
            "---:", "---:", "---:", "---:", "---");
    /** Leading columns that identify a configuration (a new result replaces the row with the same ones). */
    static final int KEY_COLUMNS = 6;

    @Option(names = "--model", required = true, paramLabel = "DIR",
            description = "Hugging Face model directory with tokenizer.json.")
    Path model;

    @Option(names = {"--held-out", "--heldout"}, required = true, paramLabel = "FILE",
            description = "Held-out UTF-8 text whose perplexity is measured.")
    Path heldout;

    @Option(names = "--calibration", paramLabel = "FILE",
            description = "Calibration UTF-8 text for AWQ/GPTQ (without it only fp32, int8, int4 RTN run).")
    Path calibration;

    @Option(names = "--variant", split = ",", paramLabel = "NAME",
            description = "fp32, int8, int4, int4-awq, int4-gptq (repeatable or comma list; fp32 always runs).")
    List<String> variants;

    @Option(names = "--group-size", defaultValue = "128", paramLabel = "32|64|128",
            description = "int4 group size (default 128).")
    int groupSize;

    @Option(names = "--seq", paramLabel = "N",
            description = "Perplexity window in tokens (default: min(max_position_embeddings, 1024)).")
    Integer seq;

    @Option(names = "--include-lm-head", description = "Quantize lm_head too.")
    boolean includeLmHead;

    @Option(names = "--include-embeddings",
            description = "Quantize the token embedding table too (round to nearest; the variant's scheme unless"
                    + " --embedding-scheme).")
    boolean includeEmbeddings;

    @Option(names = "--embedding-scheme", paramLabel = "int8|int4",
            description = "With --include-embeddings: the table's scheme for every variant (default: the variant's).")
    String embeddingScheme;

    @Option(names = "--calibration-samples", defaultValue = "16", paramLabel = "N",
            description = "Calibration sequences (default 16).")
    int calibrationSamples;

    @Option(names = "--calibration-seq-len", defaultValue = "128", paramLabel = "T",
            description = "Tokens per calibration sequence (default 128).")
    int calibrationSeqLen;

    @Option(names = "--work", paramLabel = "DIR",
            description = "Where artifacts are exported (default: a temporary directory, deleted at the end).")
    Path work;

    @Mixin BenchOptions bench = new BenchOptions("3g", 3600);

    @Override
    public Integer call() throws Exception {
        bench.validate();
        List<String> selected = selectVariants();
        if (!Files.isDirectory(model)) {
            throw new IllegalArgumentException("--model " + model + ": not a directory");
        }
        if (!Files.isRegularFile(model.resolve("tokenizer.json"))) {
            throw new IllegalArgumentException("--model " + model + " has no tokenizer.json (needed for the text)");
        }
        if (!Files.isRegularFile(heldout)) {
            throw new IllegalArgumentException("--held-out " + heldout + ": no such file");
        }
        if (calibration != null && !Files.isRegularFile(calibration)) {
            throw new IllegalArgumentException("--calibration " + calibration + ": no such file");
        }
        if (groupSize != 32 && groupSize != 64 && groupSize != 128) {
            throw new IllegalArgumentException("--group-size must be 32, 64 or 128, got " + groupSize);
        }
        if (embeddingScheme != null && !includeEmbeddings) {
            throw new IllegalArgumentException("--embedding-scheme needs --include-embeddings");
        }
        if (embeddingScheme != null && !embeddingScheme.equals("int8") && !embeddingScheme.equals("int4")) {
            throw new IllegalArgumentException("--embedding-scheme must be int8 or int4, got '" + embeddingScheme + "'");
        }
        if (seq != null && seq < 2) {
            throw new IllegalArgumentException("--seq must be at least 2, got " + seq);
        }
        if (calibrationSamples < 1 || calibrationSeqLen < 2) {
            throw new IllegalArgumentException(String.format(Locale.ROOT,
                    "need --calibration-samples >= 1 and --calibration-seq-len >= 2, got %d, %d", calibrationSamples,
                    calibrationSeqLen));
        }
        Path dir = work != null ? Files.createDirectories(work) : Files.createTempDirectory("memopt-bench-quant");
        try {
            List<JsonObject> results = new ArrayList<>();
            JsonObject base = null;
            for (String v : selected) {
                List<String> lines = FreshJvm.run(bench.heap, bench.timeout, QuantBenchWorker.class, List.of(
                        model.toAbsolutePath().toString(), v, heldout.toAbsolutePath().toString(),
                        calibration == null || !v.contains("-") ? "-" : calibration.toAbsolutePath().toString(),
                        Integer.toString(groupSize), Integer.toString(seq == null ? 0 : seq),
                        Boolean.toString(includeLmHead), dir.toAbsolutePath().toString(),
                        Integer.toString(calibrationSamples), Integer.toString(calibrationSeqLen),
                        !includeEmbeddings ? "-" : embeddingScheme != null ? embeddingScheme : "same"),
                        BenchTrainCommand.ALLOCATOR);
                JsonObject r = BenchGenerateCommand.lastJson(lines, v);
                if (base == null) {
                    base = r;
                }
                double change = r.get("perplexity").getAsDouble() / base.get("perplexity").getAsDouble() - 1;
                r.addProperty("perplexity_change", change);
                r.addProperty("artifact_ratio",
                        r.get("artifact_bytes").getAsDouble() / base.get("artifact_bytes").getAsDouble());
                System.out.println(r);
                System.out.flush();
                results.add(r);
            }
            if (bench.out != null) {
                List<List<String>> rows = new ArrayList<>();
                String date = LocalDate.now(ZoneOffset.UTC).toString();
                String name = model.toAbsolutePath().normalize().getFileName().toString();
                for (JsonObject r : results) {
                    String v = r.get("variant").getAsString();
                    boolean quantized = !v.equals("fp32");
                    rows.add(List.of(name, v, quantized && includeLmHead ? "int" : "fp32",
                            r.get("embeddings").getAsString(),
                            v.startsWith("int4") ? Integer.toString(groupSize) : "-", r.get("seq").getAsString(),
                            String.format(Locale.ROOT, "%.3f", r.get("perplexity").getAsDouble()),
                            String.format(Locale.ROOT, "%+.2f%%", 100 * r.get("perplexity_change").getAsDouble()),
                            String.format(Locale.ROOT, "%.2f", r.get("weight_bytes").getAsLong() / 1e6),
                            String.format(Locale.ROOT, "%.3f", r.get("weight_ratio").getAsDouble()),
                            quantized ? String.format(Locale.ROOT, "%.3f",
                                    r.get("quantized_layers_ratio").getAsDouble()) : "-",
                            String.format(Locale.ROOT, "%.2f", r.get("artifact_bytes").getAsLong() / 1e6),
                            String.format(Locale.ROOT, "%.1f", r.get("quantize_seconds").getAsDouble()), date));
                }
                MarkdownTable.update(bench.out, TABLE, HEADER, ALIGN, KEY_COLUMNS, rows);
            }
            if (bench.chart != null) {
                writeChart(bench.chart, results, model.toAbsolutePath().normalize().getFileName().toString());
            }
        } finally {
            if (work == null) {
                AtomicFiles.deleteTree(dir);
            }
        }
        return 0;
    }

    /** fp32 first, then the requested variants in the canonical order, deduplicated. */
    List<String> selectVariants() {
        List<String> requested = new ArrayList<>();
        if (variants == null || variants.isEmpty()) {
            requested.addAll(calibration == null ? List.of("int8", "int4") : List.of("int8", "int4", "int4-awq", "int4-gptq"));
        } else {
            for (String v : variants) {
                String n = v.trim().toLowerCase(Locale.ROOT);
                if (!QuantBenchWorker.VARIANTS.contains(n)) {
                    throw new IllegalArgumentException("unknown --variant '" + v + "': expected one of "
                            + QuantBenchWorker.VARIANTS);
                }
                if (n.contains("-") && calibration == null) {
                    throw new IllegalArgumentException("--variant " + n + " needs --calibration FILE");
                }
                requested.add(n);
            }
        }
        List<String> out = new ArrayList<>();
        for (String v : QuantBenchWorker.VARIANTS) {
            if (v.equals("fp32") || requested.contains(v)) {
                out.add(v);
            }
        }
        return out;
    }

    /** Weight bytes and perplexity of each variant as a percentage of FP32's, as a PNG bar chart (atomic write). */
    public static void writeChart(Path file, List<JsonObject> results, String modelName) throws java.io.IOException {
        DefaultCategoryDataset data = new DefaultCategoryDataset();
        for (JsonObject r : results) {
            String v = r.get("variant").getAsString();
            data.addValue(100 * r.get("weight_ratio").getAsDouble(), "weight bytes", v);
            data.addValue(100 * (1 + r.get("perplexity_change").getAsDouble()), "held-out perplexity", v);
        }
        BarChart.write(file, "Quantization of " + modelName + ": size and quality", "variant", "% of FP32", data);
    }
}
