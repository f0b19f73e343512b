package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.examples.bench.BarChart;
import ai.djl.memopt.examples.bench.FreshJvm;
import ai.djl.memopt.examples.bench.MarkdownTable;
import ai.djl.memopt.examples.bench.TrainBenchWorker;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.StatefulOptimizer;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.file.Path;
import java.time.LocalDate;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.Callable;
import picocli.CommandLine.Command;
import picocli.CommandLine.Mixin;
import picocli.CommandLine.Option;
import org.jfree.data.category.DefaultCategoryDataset;

/**
 * {@code memopt bench train}: training memory and step time of a preset (seeded random weights, random token batches)
 * in up to four modes, each in a fresh JVM running {@link TrainBenchWorker}; one JSON line per mode.
 *
 * <p>Fields: {@code peak_memory_bytes} (CPU: the process's peak RSS, {@code VmHWM}; GPU: device memory in use, sampled),
 * {@code idle_memory_bytes} (the same right before the first step, with model and optimizer built),
 * {@code state_bytes} (weights, FP32 masters, gradients and optimizer moments summed from the arrays),
 * {@code activation_bytes} (peak - idle - the state allocated lazily by the first step), {@code median_step_seconds},
 * and the configuration. {@code --out FILE} keeps a markdown table of all results in FILE (rows of the same
 * configuration are replaced), between {@code <!-- bench-train:begin -->} and {@code <!-- bench-train:end -->}.
 *
 * <pre>
 * memopt bench train --preset bench-small --batch 1 --seq 512 --steps 3 --out docs/benchmarks.md
 * memopt bench train --preset bench-small --mode fp16 --batch 4 --seq 1024 --devices gpu0,gpu1 --json
 * </pre>
 */
@Command(name = "train", mixinStandardHelpOptions = true,
        description = "Training memory and step time per mode (fp32, checkpoint, fp16, fp16+checkpoint), each in a"
                + " fresh JVM whose heap is fixed and touched at start (-Xms = -Xmx = --heap, -XX:+AlwaysPreTouch), so"
                + " that its growth is not counted as activation memory.")
public final class BenchTrainCommand implements Callable<Integer> {

    /** The modes run by default. */
    static final List<String> MODES = List.of("fp32", "checkpoint", "fp16", "fp16+checkpoint");
    /** Every mode: the defaults plus {@code qlora} (int4 base, LoRA adapters, checkpointing), asked for by name. */
    static final List<String> ALL_MODES = List.of("fp32", "checkpoint", "fp16", "fp16+checkpoint", "qlora");
    /**
     * glibc's dynamic mmap threshold rises to the size of the largest freed block, after which tensors of that size come
     * from the heap and freed ones stay resident: RSS would then measure fragmentation. A fixed threshold makes every
     * tensor above 128 KiB its own mapping, returned to the system when freed.
     */
    static final Map<String, String> ALLOCATOR = Map.of("MALLOC_MMAP_THRESHOLD_", "131072");
    static final String TABLE = "bench-train";
    static final String BEGIN = MarkdownTable.begin(TABLE);
    static final String END = MarkdownTable.end(TABLE);

    @Option(names = "--preset", defaultValue = "bench-tiny", paramLabel = "NAME",
            description = "Model preset (default bench-tiny).")
    String preset;

    @Option(names = "--model", paramLabel = "DIR",
            description = "qlora only: load this Hugging Face DeepSeek directory (F32/F16/BF16) straight into int4 with"
                    + " the streaming loader instead of building --preset with random FP32 weights.")
    Path model;

    @Option(names = "--mode", split = ",", paramLabel = "MODE",
            description = "fp32, checkpoint, fp16, fp16+checkpoint, qlora (int4 base + rank-8 LoRA + checkpointing);"
                    + " repeatable or comma list; default the first four.")
    List<String> modes;

    @Option(names = "--checkpoint", paramLabel = "all|nested|nested+experts|every:N|sqrt",
            description = "How the checkpointed modes (checkpoint, fp16+checkpoint, qlora) checkpoint the decoder"
                    + " layers. Default: nested for checkpoint (every layer, and inside it the attention and the MLP,"
                    + " recomputed one at a time during the layer's backward), nested+experts for fp16+checkpoint (the"
                    + " routed experts too: the least memory, the slowest), all (every layer) for qlora; on a GPU all"
                    + " for every checkpointed mode.")
    String checkpoint;

    @Option(names = "--batch", defaultValue = "1", paramLabel = "B", description = "Sequences per step (default 1).")
    int batch;

    @Option(names = "--seq", defaultValue = "128", paramLabel = "T", description = "Tokens per sequence (default 128).")
    int seq;

    @Option(names = "--steps", defaultValue = "3", paramLabel = "N", description = "Training steps (default 3).")
    int steps;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "Device (default cpu).")
    String device;

    @Option(names = "--devices", paramLabel = "LIST",
            description = "Data parallel over these devices (e.g. gpu0,gpu1; cpu,cpu on the CPU), --batch rows on each:"
                    + " each mode runs on the first device alone, then on all, and reports scaling_efficiency"
                    + " (tokens/s on N / N x one device's). Replaces --device.")
    String devices;

    @Option(names = "--seed", defaultValue = "42", paramLabel = "S", description = "Weights and data seed.")
    long seed;

    @Option(names = "--loss-chunk", paramLabel = "TOKENS",
            description = "Loss head computed in chunks of about this many tokens, in every mode (default "
                    + Devices.CPU_LOSS_CHUNK_TOKENS + " on the CPU, " + Devices.GPU_LOSS_CHUNK_TOKENS + " on a GPU).")
    Integer lossChunk;

    @Option(names = "--optimizer", defaultValue = "adamw", paramLabel = "adamw|adamw8bit",
            description = "Optimizer of every mode (default adamw); adamw8bit keeps both moments in 8 bits.")
    String optimizer;

    @Option(names = "--fused-update",
            description = "Update each checkpointed layer as soon as its backward is done and free its gradients"
                    + " (FP16: a layer whose gradients overflow is back-propagated again at a lower scale first).")
    boolean fusedUpdate;

    @Option(names = "--offload-optimizer",
            description = "FP32 masters and optimizer state on the host (counted in state_host_bytes).")
    boolean offloadOptimizer;

    @Mixin BenchOptions bench = new BenchOptions("512m", 3600);

    @Option(names = "--profile",
            description = "After the measured steps, time " + TrainBenchWorker.PROFILED_STEPS + " more steps phase by"
                    + " phase (forward, loss head, each level of recomputation and backward, optimizer update, host"
                    + " reads), waiting for the device at every phase boundary; adds a 'profile' object to the JSON"
                    + " and prints a table. The measured steps are not slowed.")
    boolean profile;

    @Override
    public Integer call() throws Exception {
        bench.validate();
        List<String> selected = modes == null || modes.isEmpty() ? MODES : normalise(modes);
        if (model != null) {
            if (!java.nio.file.Files.isRegularFile(model.resolve("config.json"))) {
                throw new IllegalArgumentException("--model " + model + ": no config.json");
            }
            if (!selected.equals(List.of("qlora"))) {
                throw new IllegalArgumentException("--model needs --mode qlora (the other modes hold every weight in"
                        + " float), got " + selected);
            }
        } else {
            DeepSeekConfig.preset(preset); // unknown preset: a clear error before any JVM starts
        }
        List<String> parallel = devices == null ? null : names(devices);
        if (parallel != null && model != null) {
            throw new IllegalArgumentException("--devices builds --preset on each device; --model is not replicated");
        }
        String dev = parallel != null ? parallel.get(0) : device.toLowerCase(Locale.ROOT);
        if (!dev.equals("cpu") && !dev.startsWith("gpu")) {
            throw new IllegalArgumentException("--device must be cpu or gpu, got '" + device + "'");
        }
        int chunk = Devices.lossChunkTokens(lossChunk, dev.startsWith("gpu") ? Device.gpu() : Device.cpu());
        if (batch < 1 || seq < 2 || steps < 1 || chunk < 1) {
            throw new IllegalArgumentException(String.format(Locale.ROOT,
                    "need --batch >= 1, --seq >= 2, --steps >= 1, --loss-chunk >= 1; got %d, %d, %d, %d", batch, seq,
                    steps, chunk));
        }
        String spec = checkpoint == null ? "default" : checkpoint.trim().toLowerCase(Locale.ROOT);
        if (checkpoint != null && FineTuner.checkpointPolicy(spec) == null) {
            throw new IllegalArgumentException("--checkpoint " + checkpoint + ": the checkpointed modes need a policy"
                    + " (all, nested, every:N or sqrt); --mode fp32 or fp16 runs without checkpointing");
        }
        StatefulOptimizer.Kind optimizerKind = StatefulOptimizer.Kind.parse(optimizer);
        if (optimizerKind != StatefulOptimizer.Kind.ADAMW && optimizerKind != StatefulOptimizer.Kind.ADAMW8BIT) {
            throw new IllegalArgumentException("--optimizer must be adamw or adamw8bit, got '" + optimizer + "'");
        }
        List<String> jvm = new ArrayList<>(workerJvm(bench.heap));
        if (profile) {
            jvm.add("-D" + TrainBenchWorker.PROFILE_PROPERTY + "=true");
        }
        jvm.add("-D" + TrainBenchWorker.OPTIMIZER_PROPERTY + "=" + optimizerKind.name().toLowerCase(Locale.ROOT));
        jvm.add("-D" + TrainBenchWorker.FUSED_PROPERTY + "=" + fusedUpdate);
        jvm.add("-D" + TrainBenchWorker.OFFLOAD_PROPERTY + "=" + offloadOptimizer);
        List<JsonObject> results = new ArrayList<>();
        for (String mode : selected) {
            JsonObject result = runWorker(jvm, mode, dev, chunk, spec);
            if (parallel != null) {
                // the same mode on every device, against the first device's own speed in its own JVM
                JsonObject all = runWorker(jvm, mode, String.join(",", parallel), chunk, spec);
                double one = result.get("tokens_per_second").getAsDouble();
                all.addProperty("single_device_tokens_per_second", one);
                all.addProperty("scaling_efficiency", all.get("tokens_per_second").getAsDouble()
                        / (parallel.size() * one));
                result = all;
            }
            System.out.println(result);
            if (result.has("profile")) {
                System.out.print(profileTable(result));
            }
            System.out.flush();
            results.add(result);
        }
        if (bench.chart != null) {
            DefaultCategoryDataset data = new DefaultCategoryDataset();
            for (JsonObject r : results) {
                String mode = r.get("mode").getAsString();
                data.addValue(r.get("activation_bytes").getAsLong() / 1e6, "activation MB", mode);
                data.addValue(r.get("state_bytes").getAsLong() / 1e6, "state MB", mode);
            }
            BarChart.write(bench.chart, "Training memory, " + preset + " (batch " + batch + ", seq " + seq + ")", "mode",
                    "MB", data);
        }
        if (bench.out != null) {
            updateTable(bench.out, results);
        }
        return 0;
    }

    /** One mode in a fresh worker JVM on {@code dev} (a device, or a comma list of them): its JSON result. */
    private JsonObject runWorker(List<String> jvm, String mode, String dev, int chunk, String spec)
            throws IOException, InterruptedException {
        List<String> workerArgs = new ArrayList<>(List.of(preset, mode, Integer.toString(batch),
                Integer.toString(seq), Integer.toString(steps), dev, Long.toString(seed),
                Integer.toString(chunk), spec));
        if (model != null) {
            workerArgs.add(model.toString());
        }
        List<String> lines = FreshJvm.run(jvm, ALLOCATOR, bench.timeout, TrainBenchWorker.class, workerArgs);
        JsonObject result = null;
        for (String line : lines) {
            if (line.startsWith("{")) {
                result = JsonParser.parseString(line).getAsJsonObject();
            }
        }
        if (result == null) {
            throw new IOException("the " + mode + " worker on " + dev + " printed no result; its output: " + lines);
        }
        return result;
    }

    /** {@code --devices} checked ({@link Devices#parseList}) and named as the worker reads them: cpu, gpuN. */
    private static List<String> names(String devices) {
        List<String> out = new ArrayList<>();
        for (ai.djl.Device d : Devices.parseList(devices, "--devices")) {
            out.add(d.isGpu() ? "gpu" + d.getDeviceId() : "cpu");
        }
        return out;
    }

    /**
     * A Java heap that is resident in full from the start: a growing heap (G1 touches new eden regions while the steps
     * run, or gives pages back after the GCs before the idle reading) moved the activation figure of one configuration
     * by tens of MB from run to run. Weights are direct buffers, hence the unbounded direct-memory limit.
     */
    /** How a result's optimizer differs from plain unfused on-device AdamW, for its row: e.g. {@code , adamw8bit}. */
    static String stateOptions(JsonObject r) {
        StringBuilder b = new StringBuilder();
        if (r.has("optimizer") && !"adamw".equals(r.get("optimizer").getAsString())) {
            b.append(", ").append(r.get("optimizer").getAsString());
        }
        if (r.has("fused_update") && r.get("fused_update").getAsBoolean()) {
            b.append(", fused");
        }
        if (r.has("offload_optimizer") && r.get("offload_optimizer").getAsBoolean()) {
            b.append(", offload");
        }
        return b.toString();
    }

    static List<String> workerJvm(String heap) {
        return List.of("-Xms" + heap, "-Xmx" + heap, "-XX:+AlwaysPreTouch", "-XX:MaxDirectMemorySize=1024g");
    }

    /** The profile of one result as a small text table: phase, seconds per step, share of the profiled step. */
    static String profileTable(JsonObject result) {
        JsonObject p = result.getAsJsonObject("profile");
        double step = p.get("step_seconds").getAsDouble();
        StringBuilder b = new StringBuilder();
        b.append(String.format(Locale.ROOT, "profile of %s (%s): %.4f s per profiled step, %.1f host reads per step%n",
                result.get("mode").getAsString(), result.get("checkpointing").getAsString(), step,
                p.get("host_reads_per_step").getAsDouble()));
        for (Map.Entry<String, com.google.gson.JsonElement> e : p.getAsJsonObject("phase_seconds").entrySet()) {
            double s = e.getValue().getAsDouble();
            b.append(String.format(Locale.ROOT, "  %-20s %9.4f s %6.1f%%%n", e.getKey(), s, 100 * s / step));
        }
        return b.toString();
    }

    private static List<String> normalise(List<String> modes) {
        List<String> out = new ArrayList<>();
        for (String m : modes) {
            String n = m.trim().toLowerCase(Locale.ROOT);
            if (!ALL_MODES.contains(n)) {
                throw new IllegalArgumentException("unknown --mode '" + m + "': expected one of " + ALL_MODES);
            }
            if (!out.contains(n)) {
                out.add(n);
            }
        }
        return out;
    }

    /**
     * Merges {@code results} into the results table of {@code file} ({@link MarkdownTable}), then recomputes every
     * row's ratios against the fp32 row of the same configuration.
     */
    static void updateTable(Path file, List<JsonObject> results) throws IOException {
        Map<String, List<String>> rows = new LinkedHashMap<>();
        for (List<String> cells : MarkdownTable.read(file, TABLE)) {
            if (cells.size() == HEADER.length) {
                rows.put(key(cells), new ArrayList<>(cells));
            }
        }
        String date = LocalDate.now(ZoneOffset.UTC).toString();
        for (JsonObject r : results) {
            String mode = r.get("mode").getAsString();
            String checkpointing = r.has("checkpointing") ? r.get("checkpointing").getAsString() : "none";
            if (!checkpointing.equals("none")) {
                mode += " (" + checkpointing + ")"; // rows of different policies side by side
            }
            mode += stateOptions(r);
            List<String> cells = new ArrayList<>(List.of(
                r.get("preset").getAsString(), mode, r.get("batch").getAsString(),
                r.get("seq").getAsString(), r.get("steps").getAsString(), r.get("device").getAsString(),
                mb(r, "peak_memory_bytes"), mb(r, "idle_memory_bytes"), mb(r, "state_bytes"),
                mb(r, "activation_bytes"), "", String.format(Locale.ROOT, "%.2f",
                        r.get("median_step_seconds").getAsDouble()), "", date));
            rows.put(key(cells), cells);
        }
        // ratios against the fp32 row of the same configuration
        for (List<String> c : rows.values()) {
            List<String> base = rows.get(String.join("|", c.get(0), "fp32", c.get(2), c.get(3), c.get(4), c.get(5)));
            c.set(10, base == null ? "" : ratio(c.get(9), base.get(9)));
            c.set(12, base == null ? "" : ratio(c.get(11), base.get(11)));
        }
        MarkdownTable.update(file, TABLE, List.of(HEADER), List.of(SEPARATOR), KEY_COLUMNS,
                new ArrayList<>(rows.values()));
    }

    static final String[] HEADER = {
        "preset", "mode", "batch", "seq", "steps", "device", "peak MB", "idle MB", "state MB", "activation MB",
        "activation vs fp32", "median step s", "step time vs fp32", "date"
    };
    private static final String[] SEPARATOR = {
        "---", "---", "---:", "---:", "---:", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"
    };

    /** preset, mode, batch, seq, steps and device identify a configuration. */
    private static final int KEY_COLUMNS = 6;

    private static String key(List<String> c) {
        return String.join("|", c.subList(0, KEY_COLUMNS));
    }

    private static String mb(JsonObject r, String field) {
        return String.format(Locale.ROOT, "%.1f", r.get(field).getAsLong() / 1e6);
    }

    private static String ratio(String value, String base) {
        try {
            double b = Double.parseDouble(base);
            return b <= 0 ? "" : String.format(Locale.ROOT, "%.2f", Double.parseDouble(value) / b);
        } catch (NumberFormatException e) {
            return "";
        }
    }

}
