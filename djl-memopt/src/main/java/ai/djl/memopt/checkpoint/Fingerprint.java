package ai.djl.memopt.checkpoint;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.types.DataType;
import java.util.Arrays;
import java.util.Locale;

/**
 * A few numbers summarising a segment's output (per floating array: sum, sum of absolute values and up to 8 values at
 * fixed positions), kept instead of the output so that a recomputation can be checked against the original without
 * holding the activation the checkpoint exists to free.
 */
final class Fingerprint {

    private static final int SAMPLES = 8;
    private static final double RTOL = 1e-4;
    private static final double ATOL = 1e-6;

    private final double[][] values;

    private Fingerprint(double[][] values) {
        this.values = values;
    }

    static Fingerprint of(NDList outputs) {
        double[][] values = new double[outputs.size()][];
        try (NDScope ignored = new NDScope()) {
            for (int i = 0; i < outputs.size(); i++) {
                NDArray o = outputs.get(i);
                if (!o.getDataType().isFloating() || o.size() == 0) {
                    values[i] = new double[0];
                    continue;
                }
                NDArray flat = o.toType(DataType.FLOAT32, false).flatten();
                long n = flat.size();
                int k = (int) Math.min(SAMPLES, n);
                long[] idx = new long[k];
                for (int j = 0; j < k; j++) {
                    idx[j] = k == 1 ? 0 : j * (n - 1) / (k - 1);
                }
                NDArray index = flat.getManager().create(idx).toDevice(flat.getDevice(), false);
                float[] samples = flat.take(index).toFloatArray();
                double[] v = new double[2 + k];
                v[0] = flat.sum().getFloat();
                v[1] = flat.abs().sum().getFloat();
                for (int j = 0; j < k; j++) {
                    v[2 + j] = samples[j];
                }
                values[i] = v;
            }
        }
        return new Fingerprint(values);
    }

    /** @throws NonDeterministicRecomputationException if {@code recomputed} does not match within tolerance */
    void verify(NDList recomputed, String segmentName) {
        Fingerprint other = of(recomputed);
        for (int i = 0; i < values.length; i++) {
            double[] a = values[i];
            double[] b = i < other.values.length ? other.values[i] : new double[0];
            if (a.length != b.length) {
                throw mismatch(segmentName, i, a, b);
            }
            double scale = a.length > 1 ? Math.abs(a[1]) : 0;
            for (int j = 0; j < a.length; j++) {
                double tol = ATOL + RTOL * (j < 2 ? scale : Math.abs(a[j]));
                if (!(Math.abs(a[j] - b[j]) <= tol)) {
                    throw mismatch(segmentName, i, a, b);
                }
            }
        }
    }

    private static NonDeterministicRecomputationException mismatch(String name, int output, double[] a, double[] b) {
        return new NonDeterministicRecomputationException(String.format(
                Locale.ROOT,
                "checkpointed block '%s' gave a different output %d when recomputed for backward (forward: sum,"
                        + " abs-sum, samples = %s; recomputed: %s). Its gradients would be wrong: a checkpointed"
                        + " block must be deterministic in training mode (dropout and other random ops are not; keep"
                        + " such blocks out of the checkpoint policy or set their probability to 0).",
                name, output, Arrays.toString(a), Arrays.toString(b)));
    }
}
