package ai.djl.memopt.examples.demo;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Locale;

/**
 * A ~100 ms micro-benchmark of what the engine does with FP16 on this device: the median time of a matrix product of
 * the demo model's shape ((256, 128) x (128, 384), the MLP's up-projection of one micro-batch row block) in FP16
 * against FP32, the two interleaved so that a busy machine slows both alike. Matrix products are most of a training
 * step, and they are where a CPU without FP16 arithmetic loses: libtorch converts each element through FP32.
 *
 * <p>Measured on a 2-core AMD EPYC (AVX2 + F16C, no AVX512-FP16): FP16 took 15x to 47x the time of FP32 for this
 * product in four runs on a shared machine (the whole FP16 training step, where products are part of the work, was 4x
 * to 9x slower); on a Xeon with AVX512-FP16 and AMX the demo's FP16 training ran at FP32's speed or better.
 *
 * @param fp32Seconds median seconds of one FP32 product
 * @param fp16Seconds median seconds of one FP16 product
 */
public record Fp16Probe(double fp32Seconds, double fp16Seconds) {

    /** FP16 time over FP32 time: above 1, FP16 is slower. */
    public double slowdown() {
        return fp16Seconds / fp32Seconds;
    }

    /** Measures on the CPU for about {@code budgetMillis} (at least 5 samples of each type). */
    public static Fp16Probe measure(long budgetMillis) {
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            NDArray a32 = m.randomUniform(-1f, 1f, new Shape(256, 128));
            NDArray b32 = m.randomUniform(-1f, 1f, new Shape(128, 384));
            NDArray a16 = a32.toType(DataType.FLOAT16, false);
            NDArray b16 = b32.toType(DataType.FLOAT16, false);
            time(a32, b32);
            time(a16, b16); // first calls: kernel selection and caches
            List<Double> t32 = new ArrayList<>();
            List<Double> t16 = new ArrayList<>();
            long deadline = System.nanoTime() + budgetMillis * 1_000_000L;
            while (t32.size() < 5 || System.nanoTime() < deadline && t32.size() < 2000) {
                t32.add(time(a32, b32));
                t16.add(time(a16, b16));
            }
            return new Fp16Probe(median(t32), median(t16));
        }
    }

    private static double time(NDArray a, NDArray b) {
        long t0 = System.nanoTime();
        a.matMul(b).close(); // synchronous on the CPU, the only device the demo probes

        return (System.nanoTime() - t0) / 1e9;
    }

    private static double median(List<Double> values) {
        List<Double> sorted = new ArrayList<>(values);
        Collections.sort(sorted);
        return sorted.get(sorted.size() / 2);
    }

    @Override
    public String toString() {
        return String.format(Locale.ROOT, "an FP16 matrix product took %.1fx the time of FP32's (%.0f vs %.0f us)",
                slowdown(), fp16Seconds * 1e6, fp32Seconds * 1e6);
    }
}
