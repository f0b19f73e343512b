package ai.djl.memopt.examples.bench;

import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.quantize.StreamingQuantizedLoader;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;

/**
 * Measures the host memory of loading a Hugging Face DeepSeek directory as int4 (RTN), in a fresh JVM so that the peak
 * is this load's own, and prints one JSON line.
 *
 * <p>Arguments: {@code dir stream|eager groupSize}. {@code stream} is {@link StreamingQuantizedLoader#load};
 * {@code eager} is {@link DeepSeekLoader#load} in FP32 followed by {@link Quantizer#quantize}, the path that holds the
 * whole float model first.
 *
 * <p>Before loading, the engine is warmed up (one small quantization, so libtorch's kernels and thread pools exist),
 * and the kernel's peak-RSS counter is reset ({@code 5 > /proc/self/clear_refs}; {@code peak_reset} says whether that
 * worked; when it did not, the peak also covers JVM start-up, which only overstates the load's share). Printed:
 * {@code rss_before}, {@code peak} (VmHWM after loading), {@code rss_after}, {@code model_bytes} (the loaded model's
 * arrays: quantized codes, scales, zero points and every float parameter), {@code quantized_layers}, and
 * {@code logits_sum} of an 8-token forward (the model works).
 */
public final class StreamLoadWorker {

    private StreamLoadWorker() {}

    public static void main(String[] args) throws Exception {
        if (args.length < 3 || args.length > 4 || !("stream".equals(args[1]) || "eager".equals(args[1]))) {
            System.err.println("usage: StreamLoadWorker dir stream|eager groupSize [warmupDir]");
            System.exit(2);
        }
        Path dir = Path.of(args[0]);
        boolean stream = "stream".equals(args[1]);
        QuantizationConfig config = Int4WeightOnlyConfig.builder().optGroupSize(Integer.parseInt(args[2])).build();
        try (NDManager manager = NDManager.newBaseManager()) {
            try (NDManager warm = manager.newSubManager()) {
                if (args.length == 4) {
                    // the same load of a small model: libtorch's kernels and code pages are in before the baseline
                    forward(load(Path.of(args[3]), stream, warm, config).model(), warm);
                } else {
                    NDArray w = warm.randomNormal(new Shape(64, 256));
                    QuantizedTensor.quantize(w, QuantScheme.INT4_WEIGHT_ONLY, 128).close();
                }
            }
            System.gc();
            boolean reset = resetPeak();
            long before = MemoryStats.residentBytes();
            StreamingQuantizedLoader.Result r = load(dir, stream, manager, config);
            DeepSeekForCausalLM lm = r.model();
            QuantizationReport report = r.report();
            long peak = MemoryStats.peakResidentBytes();
            long after = MemoryStats.residentBytes();
            long modelBytes = QuantBenchWorker.weightBytes(lm);
            double logitsSum = forward(lm, manager);
            JsonObject out = new JsonObject();
            out.addProperty("mode", args[1]);
            out.addProperty("peak_reset", reset);
            out.addProperty("rss_before", before);
            out.addProperty("peak", peak);
            out.addProperty("rss_after", after);
            out.addProperty("model_bytes", modelBytes);
            out.addProperty("quantized_layers", report.layers().size());
            out.addProperty("logits_sum", logitsSum);
            System.out.println(out);
        }
    }

    private static StreamingQuantizedLoader.Result load(Path dir, boolean stream, NDManager manager,
            QuantizationConfig config) throws IOException {
        if (stream) {
            return StreamingQuantizedLoader.load(dir, manager, DataType.FLOAT32, config);
        }
        DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, manager, DataType.FLOAT32);
        return new StreamingQuantizedLoader.Result(lm, Quantizer.quantize(lm, config));
    }

    private static double forward(DeepSeekForCausalLM lm, NDManager manager) {
        try (NDManager f = manager.newSubManager()) {
            NDArray ids = f.arange(0, 8, 1, DataType.INT64).reshape(1, 8);
            NDArray logits = lm.forward(new ParameterStore(f, false), new NDList(ids), false).head();
            return logits.sum().getFloat();
        }
    }

    /** Resets VmHWM to the current RSS (Linux 4.0+); false where /proc does not allow it. */
    static boolean resetPeak() {
        try {
            Files.writeString(Path.of("/proc/self/clear_refs"), "5");
            return true;
        } catch (IOException | UnsupportedOperationException | SecurityException e) {
            return false;
        }
    }
}
