package ai.djl.memopt.examples.bench;

import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.memopt.quantize.StreamingQuantizedLoader;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonObject;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.stream.Stream;

/**
 * {@code memopt bench load}'s worker: loads a Hugging Face DeepSeek directory through
 * {@link StreamingQuantizedLoader} in a fresh JVM and prints one JSON line with the host memory it took.
 *
 * <p>Arguments: {@code dir int4|int8 groupSize fp32|fp16 forwardTokens}. The engine is warmed up first (a small
 * quantization), then the kernel's peak-RSS counter is reset ({@code peak_reset}). Fields: {@code checkpoint_bytes}
 * (the safetensors files), {@code largest_tensor_bytes} (as stored), {@code rss_before}, {@code peak} (VmHWM after
 * the load), {@code rss_after}, {@code model_bytes} (every array of the loaded model: codes, scales, zero points,
 * float parameters), {@code quantized_bytes} (the quantized layers only), {@code load_seconds},
 * {@code forward_seconds} and {@code logits_finite} of a {@code forwardTokens}-token forward (the model is usable),
 * and {@code mem_total}/{@code mem_available_before} (from /proc/meminfo) for context.
 */
public final class LoadBenchWorker {

    private LoadBenchWorker() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 5) {
            System.err.println("usage: LoadBenchWorker dir int4|int8 groupSize fp32|fp16 forwardTokens");
            System.exit(2);
        }
        Path dir = Path.of(args[0]);
        QuantizationConfig config = config(args[1], Integer.parseInt(args[2]));
        DataType dtype = "fp16".equals(args[3]) ? DataType.FLOAT16 : DataType.FLOAT32;
        int tokens = Integer.parseInt(args[4]);
        long checkpointBytes = 0;
        long largest = 0;
        String largestName = null;
        try (HfCheckpoint ckpt = HfCheckpoint.open(dir)) {
            for (Path f : ckpt.files()) {
                checkpointBytes += Files.size(f);
            }
            for (String name : ckpt.names()) {
                TensorInfo info = ckpt.info(name);
                if (info.byteLength() > largest) {
                    largest = info.byteLength();
                    largestName = name;
                }
            }
        }
        JsonObject out = new JsonObject();
        out.addProperty("scheme", args[1]);
        out.addProperty("group_size", Integer.parseInt(args[2]));
        out.addProperty("dtype", args[3]);
        out.addProperty("checkpoint_bytes", checkpointBytes);
        out.addProperty("largest_tensor", largestName);
        out.addProperty("largest_tensor_bytes", largest);
        out.addProperty("mem_total", meminfo("MemTotal"));
        try (NDManager manager = NDManager.newBaseManager()) {
            try (NDManager warm = manager.newSubManager()) {
                NDArray w = warm.randomNormal(new Shape(64, 256));
                QuantizedTensor.quantize(w, QuantScheme.INT4_WEIGHT_ONLY, 128).close();
            }
            System.gc();
            boolean reset = StreamLoadWorker.resetPeak();
            out.addProperty("mem_available_before", meminfo("MemAvailable"));
            long before = MemoryStats.residentBytes();
            long start = System.nanoTime();
            StreamingQuantizedLoader.Result r = StreamingQuantizedLoader.load(dir, manager, dtype, config);
            double loadSeconds = (System.nanoTime() - start) / 1e9;
            // resident set first: read the other way round, a page touched between the two reads made rss_after
            // exceed the peak (seen once in the test suite)
            long after = MemoryStats.residentBytes();
            long peak = Math.max(MemoryStats.peakResidentBytes(), after);
            DeepSeekForCausalLM lm = r.model();
            QuantizationReport report = r.report();
            long floatBytes = QuantBenchWorker.floatBytes(lm);
            long quantizedBytes = QuantBenchWorker.quantizedBytes(lm);
            out.addProperty("peak_reset", reset);
            out.addProperty("rss_before", before);
            out.addProperty("peak", peak);
            out.addProperty("rss_after", after);
            out.addProperty("model_bytes", floatBytes + quantizedBytes);
            out.addProperty("float_bytes", floatBytes);
            out.addProperty("quantized_bytes", quantizedBytes);
            out.addProperty("quantized_layers", report.layers().size());
            out.addProperty("report_bytes_before", report.bytesBefore());
            out.addProperty("report_bytes_after", report.bytesAfter());
            out.addProperty("min_sqnr_db", report.minSqnrDb());
            out.addProperty("load_seconds", loadSeconds);
            if (tokens > 0) {
                long f0 = System.nanoTime();
                try (NDManager f = manager.newSubManager()) {
                    NDArray ids = f.arange(0, tokens, 1, DataType.INT64).reshape(1, tokens);
                    NDArray logits = lm.forward(new ParameterStore(f, false), new NDList(ids), false).head();
                    out.addProperty("forward_tokens", tokens);
                    out.addProperty("logits_shape", logits.getShape().toString());
                    out.addProperty("logits_finite", logits.isInfinite().logicalOr(logits.isNaN()).none()
                            .getBoolean());
                    out.addProperty("logits_mean_abs", logits.abs().mean().getFloat());
                }
                out.addProperty("forward_seconds", (System.nanoTime() - f0) / 1e9);
                out.addProperty("peak_after_forward", MemoryStats.peakResidentBytes());
            }
            System.out.println(out);
        }
    }

    static QuantizationConfig config(String scheme, int groupSize) {
        switch (scheme) {
            case "int4":
                return Int4WeightOnlyConfig.builder().optGroupSize(groupSize).build();
            case "int8":
                return Int8WeightOnlyConfig.builder().build();
            default:
                throw new IllegalArgumentException("scheme must be int4 or int8, got '" + scheme + "'");
        }
    }

    /** A /proc/meminfo field in bytes, or -1 where there is none. */
    static long meminfo(String field) {
        try (Stream<String> lines = Files.lines(Path.of("/proc/meminfo"))) {
            return lines.filter(l -> l.startsWith(field + ":")).findFirst()
                    .map(l -> Long.parseLong(l.replaceAll("[^0-9]", "")) * 1024).orElse(-1L);
        } catch (Exception e) {
            return -1;
        }
    }
}
