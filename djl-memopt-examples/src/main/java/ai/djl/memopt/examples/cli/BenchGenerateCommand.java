package ai.djl.memopt.examples.cli;

import ai.djl.memopt.examples.bench.BarChart;
import ai.djl.ndarray.types.DataType;
import ai.djl.memopt.examples.bench.FreshJvm;
import ai.djl.memopt.examples.bench.GenerateBenchWorker;
import ai.djl.memopt.examples.bench.MarkdownTable;
import ai.djl.memopt.inference.DecodePath;
import ai.djl.memopt.inference.ExpertDispatch;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
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
 * {@code memopt bench generate}: decoding speed and memory of a preset with the compressed MLA cache (seeded random
 * weights, seeded random prompts, greedy), each batch size in a fresh JVM running {@link GenerateBenchWorker}; one JSON
 * line per configuration.
 *
 * <p>Fields: {@code tokens_per_second} (new tokens across the batch per second of single-token decode steps, the
 * prefill excluded), {@code prefill_seconds} and {@code prefill_tokens_per_second}, {@code cache_bytes_per_token}
 * ({@code (kv_lora_rank + qk_rope_head_dim) x layers x element bytes}) and {@code hf_cache_bytes_per_token} (a Hugging
 * Face-style per-head cache, {@code heads x (qk_head_dim + v_head_dim) x layers x element bytes}),
 * {@code cache_bytes} (the session's buffers), {@code peak_memory_bytes} (CPU: peak RSS; GPU: device memory in use,
 * sampled) and the configuration. {@code --out FILE} keeps a markdown table of results between
 * {@code <!-- bench-generate:begin -->} and {@code <!-- bench-generate:end -->}.
 *
 * <pre>
 * memopt bench generate --preset bench-small --prompt-tokens 512 --max-new-tokens 128 --batch 1,8 --out docs/benchmarks.md
 * </pre>
 */
@Command(name = "generate", mixinStandardHelpOptions = true,
        description = "Decoding speed, KV-cache size and peak memory with the compressed MLA cache; each batch size in a"
                + " fresh JVM.")
public final class BenchGenerateCommand implements Callable<Integer> {

    static final String TABLE = "bench-generate";
    private String dtypeName = "fp32";
    static final List<String> HEADER = List.of("preset", "batch", "prompt", "new", "device", "prefill chunk", "decode tok/s",
            "prefill s", "MLA cache B/token", "per-head cache B/token", "cache ratio", "peak MB", "date");
    static final List<String> ALIGN = List.of("---", "---:", "---:", "---:", "---", "---:", "---:", "---:", "---:", "---:",
            "---:", "---:", "---");

    @Option(names = "--preset", defaultValue = "bench-tiny", paramLabel = "NAME",
            description = "Model preset (default bench-tiny).")
    String preset;

    @Option(names = "--prompt-tokens", defaultValue = "512", paramLabel = "P",
            description = "Prompt length in tokens (default 512).")
    int promptTokens;

    @Option(names = {"--max-new-tokens", "--new-tokens"}, defaultValue = "128", paramLabel = "N",
            description = "Tokens generated per sequence (default 128).")
    int newTokens;

    @Option(names = "--batch", split = ",", paramLabel = "B",
            description = "Batch size(s), repeatable or a comma list; each runs in its own JVM (default 1).")
    List<Integer> batches;

    @Option(names = "--prefill-chunk", defaultValue = "512", paramLabel = "T",
            description = "Prompt tokens per prefill call (default 512, the Generator's default): bounds the prefill's"
                    + " activation memory.")
    int prefillChunk;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "Device (default cpu).")
    String device;

    @Option(names = "--dtype", defaultValue = "fp32", paramLabel = "fp32|fp16",
            description = "Weight and activation type of the model (default fp32); fp16 keeps the router, norms and"
                    + " softmax in FP32 as generation does with an FP16 model.")
    String dtype;

    @Option(names = "--expert-dispatch", defaultValue = "auto", paramLabel = "auto|gathered|sorted",
            description = "How decode steps run the routed experts (default auto: gathered on a GPU, where it avoids a "
                    + "host read per MoE layer, sorted on the CPU). See docs/inference.md.")
    String expertDispatch;

    @Option(names = "--decode-path", defaultValue = "auto", paramLabel = "auto|torchscript|java",
            description = "How decode steps run the layers (default auto: one generated TorchScript call per step where"
                    + " every layer is plain, else the Java path; on a GPU only for batches up to"
                    + " -Dai.djl.memopt.decode.scriptMaxBatch, default 3). Each batch's decode_path says which ran.")
    String decodePath;

    @Option(names = "--seed", defaultValue = "42", paramLabel = "S", description = "Weights and prompt seed.")
    long seed;

    @Mixin BenchOptions bench = new BenchOptions("3g", 3600);

    @Override
    public Integer call() throws Exception {
        bench.validate();
        DeepSeekConfig config = DeepSeekConfig.preset(preset); // unknown preset: a clear error before any JVM starts
        List<Integer> selected = batches == null || batches.isEmpty() ? List.of(1) : batches;
        for (int b : selected) {
            if (b < 1) {
                throw new IllegalArgumentException("--batch must be >= 1, got " + b);
            }
        }
        if (promptTokens < 1 || newTokens < 2) {
            throw new IllegalArgumentException(String.format(Locale.ROOT,
                    "need --prompt-tokens >= 1 and --max-new-tokens >= 2 (the first comes from the prefill); got %d, %d",
                    promptTokens, newTokens));
        }
        if (prefillChunk < 1) {
            throw new IllegalArgumentException("--prefill-chunk must be >= 1, got " + prefillChunk);
        }
        if ((long) promptTokens + newTokens > config.maxPositionEmbeddings()) {
            throw new IllegalArgumentException(String.format(Locale.ROOT,
                    "--prompt-tokens + --max-new-tokens = %d exceeds the preset's max_position_embeddings %d",
                    (long) promptTokens + newTokens, config.maxPositionEmbeddings()));
        }
        String dev = device.toLowerCase(Locale.ROOT);
        if (!dev.equals("cpu") && !dev.equals("gpu")) {
            throw new IllegalArgumentException("--device must be cpu or gpu, got '" + device + "'");
        }
        DataType type = Devices.dtype(dtype); // a clear error before any JVM starts
        dtypeName = type == DataType.FLOAT16 ? "fp16" : "fp32";
        String dispatch = expertDispatch.trim().toLowerCase(Locale.ROOT);
        if (!List.of("auto", "gathered", "sorted").contains(dispatch)) {
            throw new IllegalArgumentException(
                    "--expert-dispatch must be auto, gathered or sorted, got '" + expertDispatch + "'");
        }
        String path = decodePath.trim().toLowerCase(Locale.ROOT);
        if (!List.of("auto", "torchscript", "java").contains(path)) {
            throw new IllegalArgumentException(
                    "--decode-path must be auto, torchscript or java, got '" + decodePath + "'");
        }
        // the workers inherit every ai.djl.* system property (FreshJvm), and the decoder's AUTO follows these
        String previous = System.setProperty(ExpertDispatch.PROPERTY, dispatch);
        String previousPath = System.setProperty(DecodePath.PROPERTY, path);
        try {
            return runWorkers(selected, dev);
        } finally {
            restore(ExpertDispatch.PROPERTY, previous);
            restore(DecodePath.PROPERTY, previousPath);
        }
    }

    private static void restore(String property, String previous) {
        if (previous == null) {
            System.clearProperty(property);
        } else {
            System.setProperty(property, previous);
        }
    }

    private Integer runWorkers(List<Integer> selected, String dev) throws IOException {
        List<JsonObject> results = new ArrayList<>();
        for (int b : selected) {
            List<String> lines = FreshJvm.run(bench.heap, bench.timeout, GenerateBenchWorker.class, List.of(preset,
                    Integer.toString(b), Integer.toString(promptTokens), Integer.toString(newTokens), dev,
                    Long.toString(seed), Integer.toString(prefillChunk), dtypeName), BenchTrainCommand.ALLOCATOR);
            JsonObject result = lastJson(lines, "batch " + b);
            System.out.println(result);
            System.out.flush();
            results.add(result);
        }
        if (bench.chart != null) {
            DefaultCategoryDataset data = new DefaultCategoryDataset();
            for (JsonObject r : results) {
                String batch = "batch " + r.get("batch").getAsString();
                data.addValue(r.get("cache_bytes_per_token").getAsLong() / 1024.0, "MLA latent cache", batch);
                data.addValue(r.get("hf_cache_bytes_per_token").getAsLong() / 1024.0, "per-head cache", batch);
                data.addValue(r.get("peak_memory_bytes").getAsLong() / 1048576.0 / 100, "peak memory (100 MiB)", batch);
            }
            BarChart.write(bench.chart, "Generation, " + preset + ": cache KiB per token and peak memory", "batch",
                    "KiB per token / 100 MiB", data);
        }
        if (bench.out != null) {
            List<List<String>> rows = new ArrayList<>();
            String date = LocalDate.now(ZoneOffset.UTC).toString();
            for (JsonObject r : results) {
                long mla = r.get("cache_bytes_per_token").getAsLong();
                long hf = r.get("hf_cache_bytes_per_token").getAsLong();
                rows.add(List.of(r.get("preset").getAsString(), r.get("batch").getAsString(),
                        r.get("prompt_tokens").getAsString(), r.get("new_tokens").getAsString(),
                        r.get("device").getAsString()
                                + ("float16".equals(r.get("dtype").getAsString()) ? " fp16" : "")
                                + (r.has("decode_path") && "torchscript".equals(r.get("decode_path").getAsString())
                                        ? " torchscript" : ""),
                        r.get("prefill_chunk").getAsString(),
                        String.format(Locale.ROOT, "%.1f", r.get("tokens_per_second").getAsDouble()),
                        String.format(Locale.ROOT, "%.2f", r.get("prefill_seconds").getAsDouble()),
                        Long.toString(mla), Long.toString(hf),
                        String.format(Locale.ROOT, "%.1fx", hf / (double) mla),
                        String.format(Locale.ROOT, "%.1f", r.get("peak_memory_bytes").getAsLong() / 1e6), date));
            }
            MarkdownTable.update(bench.out, TABLE, HEADER, ALIGN, 6, rows);
        }
        return 0;
    }

    /** The last JSON object line a worker printed. */
    static JsonObject lastJson(List<String> lines, String what) throws IOException {
        JsonObject result = null;
        for (String line : lines) {
            if (line.startsWith("{")) {
                result = JsonParser.parseString(line).getAsJsonObject();
            }
        }
        if (result == null) {
            throw new IOException("the " + what + " worker printed no result; its output: " + lines);
        }
        return result;
    }
}
