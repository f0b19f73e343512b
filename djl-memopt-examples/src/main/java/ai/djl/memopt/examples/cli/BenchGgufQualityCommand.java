package ai.djl.memopt.examples.cli;

import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.examples.bench.BarChart;
import ai.djl.memopt.examples.bench.MarkdownTable;
import ai.djl.memopt.gguf.GgmlType;
import ai.djl.memopt.gguf.GgufExporter;
import ai.djl.memopt.gguf.GgufLoader;
import ai.djl.memopt.gguf.GgufQuantizer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.LocalDate;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.Callable;
import org.jfree.data.category.DefaultCategoryDataset;
import picocli.CommandLine.Command;
import picocli.CommandLine.Mixin;
import picocli.CommandLine.Option;

/**
 * {@code memopt bench gguf-quality}: held-out loss of a model's GGUF exports in the real llama.cpp against ours. For
 * each type: our quantized model ({@link GgufQuantizer}: the blocks the file holds, in our layers), its export, the
 * export loaded back natively ({@code perplexity --model FILE.gguf} computes the same), and llama.cpp's per-token
 * log-probabilities (node-llama-cpp 3.21.1) on the same windows of the text; one JSON line per type. For F32 the
 * reference is the source model itself.
 *
 * <pre>
 * memopt bench gguf-quality --model out/demo/model --text out/demo/data/heldout.txt --out docs/benchmarks.md
 * </pre>
 */
@Command(name = "gguf-quality", mixinStandardHelpOptions = true,
        description = "Held-out loss of GGUF exports: ours (in memory and loaded back) against llama.cpp's.")
public final class BenchGgufQualityCommand implements Callable<Integer> {

    static final String TABLE = "bench-gguf-quality";
    static final List<String> HEADER = List.of("model", "type", "tokens", "ours loss", "GGUF loaded loss",
            "llama.cpp loss", "abs(ours - llama.cpp) / ours", "mean abs(d log p) per token", "date");
    static final List<String> ALIGN = List.of("---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---");

    @Option(names = "--model", required = true, paramLabel = "DIR", description = "Model directory (tokenizer.json).")
    Path model;

    @Option(names = "--text", required = true, paramLabel = "FILE", description = "Held-out UTF-8 text.")
    Path text;

    @Option(names = "--types", split = ",", defaultValue = "f32,q8_0,q4_0", paramLabel = "T",
            description = "GGUF types (default f32,q8_0,q4_0).")
    List<String> types;

    @Option(names = "--seq", defaultValue = "256", paramLabel = "N", description = "Window length (default 256).")
    int seq;

    @Option(names = "--windows", defaultValue = "16", paramLabel = "K",
            description = "Consecutive windows scored from the start of the text (default 16).")
    int windows;

    @Option(names = "--llama-cpp", defaultValue = "djl-memopt-examples/target/llama-cpp", paramLabel = "DIR",
            description = "Directory with node_modules/node-llama-cpp and llama-check.mjs.")
    Path llamaCpp;

    @Mixin BenchOptions bench = new BenchOptions(3600);

    @Override
    public Integer call() throws Exception {
        bench.validate();
        LlamaCppScript script = new LlamaCppScript(llamaCpp, bench.timeout);
        long[] all = PerplexityCommand.tokenize(model, text);
        List<long[]> ws = new ArrayList<>();
        for (int i = 0; i < windows && (i + 1) * seq <= all.length; i++) {
            ws.add(Arrays.copyOfRange(all, i * seq, (i + 1) * seq));
        }
        if (ws.isEmpty()) {
            throw new IllegalArgumentException(text + " has " + all.length + " tokens, fewer than one window of " + seq);
        }
        List<List<String>> rows = new ArrayList<>();
        DefaultCategoryDataset chart = new DefaultCategoryDataset();
        Path dir = Files.createTempDirectory("memopt-gguf-quality-");
        try {
            for (String name : types) {
                GgmlType type = GgufCommand.parseType(name.trim());
                Path file = dir.resolve(type.name().toLowerCase(Locale.ROOT) + ".gguf");
                double[] ours;
                double[] loaded;
                try (NDManager m = NDManager.newBaseManager()) {
                    DeepSeekForCausalLM lm = ModelDirectories.loadFloat(model, m, DataType.FLOAT32);
                    if (type != GgmlType.F32) {
                        GgufQuantizer.quantize(lm, type);
                    }
                    ours = logProbs(lm, m, ws);
                    GgufExporter.export(lm, model, type, file, null);
                    loaded = logProbs(GgufLoader.load(file, m, DataType.FLOAT32, true), m, ws);
                }
                JsonObject job = new JsonObject();
                job.addProperty("model", file.toAbsolutePath().toString());
                job.addProperty("contextSize", seq);
                JsonArray lp = new JsonArray();
                ws.forEach(w -> lp.add(LlamaCppScript.ids(w)));
                job.add("logprobs", lp);
                JsonArray theirsJson = script.run(job).getAsJsonArray("logprobs");
                double[] theirs = new double[ours.length];
                int k = 0;
                for (int w = 0; w < theirsJson.size(); w++) {
                    for (var v : theirsJson.get(w).getAsJsonArray()) {
                        theirs[k++] = v.getAsDouble();
                    }
                }
                double a = -mean(ours);
                double b = -mean(loaded);
                double c = -mean(theirs);
                double d = 0;
                for (int i = 0; i < ours.length; i++) {
                    d += Math.abs(ours[i] - theirs[i]);
                }
                d /= ours.length;
                chart.addValue(a, "djl-memopt", type.name());
                chart.addValue(b, "GGUF loaded back", type.name());
                chart.addValue(c, "llama.cpp", type.name());
                JsonObject o = new JsonObject();
                o.addProperty("model", model.toString());
                o.addProperty("type", type.name());
                o.addProperty("tokens", ours.length);
                o.addProperty("ours_loss", a);
                o.addProperty("gguf_loaded_loss", b);
                o.addProperty("llama_cpp_loss", c);
                o.addProperty("relative_difference", Math.abs(a - c) / a);
                o.addProperty("mean_abs_logprob_difference", d);
                System.out.println(o);
                rows.add(List.of(model.getFileName().toString(), type.name(), Integer.toString(ours.length),
                        String.format(Locale.ROOT, "%.6f", a), String.format(Locale.ROOT, "%.6f", b),
                        String.format(Locale.ROOT, "%.6f", c),
                        String.format(Locale.ROOT, "%.4f%%", 100 * Math.abs(a - c) / a),
                        String.format(Locale.ROOT, "%.4f", d), LocalDate.now(ZoneOffset.UTC).toString()));
                Files.delete(file);
            }
        } finally {
            Files.deleteIfExists(dir);
        }
        if (bench.out != null) {
            MarkdownTable.update(bench.out, TABLE, HEADER, ALIGN, 2, rows);
        }
        if (bench.chart != null) {
            BarChart.write(bench.chart, "Held-out loss of GGUF exports, " + model.getFileName(), "type", "loss", chart);
        }
        return 0;
    }

    /** log p(ids[i+1] | ids[..i]) of every window, concatenated. */
    private static double[] logProbs(DeepSeekForCausalLM lm, NDManager parent, List<long[]> ws) {
        List<Double> out = new ArrayList<>();
        for (long[] ids : ws) {
            try (NDManager m = parent.newSubManager()) {
                NDArray input = m.create(ids).reshape(1, ids.length);
                NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(input), false).head(); // (1,T,V)
                float[] lp = logits.logSoftmax(-1).toFloatArray();
                int v = (int) logits.getShape().get(2);
                for (int i = 0; i + 1 < ids.length; i++) {
                    out.add((double) lp[i * v + (int) ids[i + 1]]);
                }
            }
        }
        return out.stream().mapToDouble(Double::doubleValue).toArray();
    }

    private static double mean(double[] v) {
        double s = 0;
        for (double x : v) {
            s += x;
        }
        return s / v.length;
    }
}
