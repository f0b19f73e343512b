package ai.djl.memopt.examples.bench;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.function.LongConsumer;

/**
 * Writes a Hugging Face-layout BF16 checkpoint of a DeepSeek config with seeded random weights, to measure loading a
 * model too large to hold in float without downloading one: {@code config.json}, shards
 * {@code model-0000i-of-0000n.safetensors} of at most {@code shardBytes} each and {@code model.safetensors.index.json},
 * tensors named and shaped exactly as {@link DeepSeekForCausalLM} expects (the shapes come from the model itself).
 *
 * <p>Values: norms 1.0, every other tensor {@code N(0, initializer_range)} (0.02 for the presets). They are drawn four
 * at a time from one 64-bit xorshift output, each 16-bit slice indexing a table of the 65,536 normal quantiles
 * {@code Φ⁻¹((i + 0.5) / 65536)} already rounded to BF16: the distribution is the normal one up to ±4.3σ (no further
 * tail), at about a nanosecond a value, which matters at 15.7B values. Seeded per tensor name, so a tensor's values do
 * not depend on sharding.
 *
 * <p>Memory: one reusable buffer the size of the largest tensor (BF16); each shard is written through
 * {@link SafetensorsWriter} (temporary file, forced, renamed), the index and config last, so an interrupted run leaves
 * no directory that looks complete.
 *
 * <pre>{@code
 * SyntheticCheckpoint.write(DeepSeekConfig.preset("deepseek-v2-lite"), Path.of("v2-lite-bf16"), 42, 5L << 30, null);
 * }</pre>
 */
public final class SyntheticCheckpoint {

    private static final int TABLE_SIZE = 1 << 16;

    private SyntheticCheckpoint() {}

    /** What was written. */
    public static final class Summary {
        private final long parameters;
        private final long bytes;
        private final long largestTensorBytes;
        private final String largestTensor;
        private final int shards;

        Summary(long parameters, long bytes, long largestTensorBytes, String largestTensor, int shards) {
            this.parameters = parameters;
            this.bytes = bytes;
            this.largestTensorBytes = largestTensorBytes;
            this.largestTensor = largestTensor;
            this.shards = shards;
        }

        public long parameters() {
            return parameters;
        }

        /** Tensor bytes (BF16), without headers. */
        public long bytes() {
            return bytes;
        }

        public long largestTensorBytes() {
            return largestTensorBytes;
        }

        public String largestTensor() {
            return largestTensor;
        }

        public int shards() {
            return shards;
        }
    }

    /**
     * The Hugging Face tensor names and shapes of a model of {@code config}, in the model's parameter order. Allocates
     * only 1-element placeholders.
     */
    public static Map<String, Shape> tensorShapes(DeepSeekConfig config) {
        Map<String, Shape> shapes = new LinkedHashMap<>();
        DeepSeekForCausalLM lm = new DeepSeekForCausalLM(config);
        try (NDManager manager = NDManager.newBaseManager()) {
            lm.initializeWith(manager, DataType.FLOAT32, name -> (m, shape, dtype) -> {
                shapes.put(name, shape);
                return m.zeros(new Shape(1), dtype);
            });
        }
        return shapes;
    }

    /**
     * Writes the checkpoint into {@code dir} (created if needed; existing files of the same names are replaced).
     *
     * @param shardBytes the most tensor bytes in one shard (a larger tensor gets a shard of its own)
     * @param progress told the bytes written so far after each tensor (may be null)
     */
    public static Summary write(DeepSeekConfig config, Path dir, long seed, long shardBytes, LongConsumer progress)
            throws IOException {
        Preconditions.checkNotNull(config, "config");
        Preconditions.checkArgument(shardBytes > 0, "shardBytes must be positive, got %s", shardBytes);
        Map<String, Shape> shapes = tensorShapes(config);
        List<List<String>> shards = new ArrayList<>();
        List<String> current = new ArrayList<>();
        long inShard = 0;
        long total = 0;
        long params = 0;
        long largest = 0;
        String largestName = null;
        for (Map.Entry<String, Shape> e : shapes.entrySet()) {
            long bytes = 2 * e.getValue().size();
            if (!current.isEmpty() && inShard + bytes > shardBytes) {
                shards.add(current);
                current = new ArrayList<>();
                inShard = 0;
            }
            current.add(e.getKey());
            inShard += bytes;
            total += bytes;
            params += e.getValue().size();
            if (bytes > largest) {
                largest = bytes;
                largestName = e.getKey();
            }
        }
        if (!current.isEmpty()) {
            shards.add(current);
        }
        Preconditions.checkArgument(largest <= Integer.MAX_VALUE, "tensor %s has %s bytes; over 2 GiB is not supported",
                largestName, largest);
        Files.createDirectories(dir);
        short[] table = bf16NormalTable((float) config.initializerRange());
        ByteBuffer buffer = ByteBuffer.allocateDirect((int) largest).order(ByteOrder.LITTLE_ENDIAN);
        JsonObject weightMap = new JsonObject();
        long[] written = {0};
        for (int s = 0; s < shards.size(); s++) {
            String file = HfCheckpoint.shardFileName(s, shards.size());
            SafetensorsWriter writer = new SafetensorsWriter().putMetadata("format", "pt");
            for (String name : shards.get(s)) {
                Shape shape = shapes.get(name);
                writer.add(name, SafetensorsDType.BF16, shape.getShape(), () -> {
                    ByteBuffer view = fill(buffer, name, shape.size(), seed, table);
                    written[0] += 2 * shape.size();
                    if (progress != null) {
                        progress.accept(written[0]);
                    }
                    return view;
                });
                weightMap.addProperty(name, file);
            }
            writer.write(dir.resolve(file));
        }
        HfCheckpoint.writeIndex(dir, weightMap, total);
        AtomicFiles.writeString(dir.resolve("config.json"), config.toJson() + "\n");
        return new Summary(params, total, largest, largestName, shards.size());
    }

    /** Fills the start of {@code buffer} with one tensor's BF16 values and returns a view of exactly those bytes. */
    static ByteBuffer fill(ByteBuffer buffer, String name, long numel, long seed, short[] table) {
        int n = Math.toIntExact(numel);
        ByteBuffer view = buffer.duplicate().order(ByteOrder.LITTLE_ENDIAN);
        view.clear().limit(2 * n);
        if (name.endsWith("norm.weight")) {
            short one = (short) (Float.floatToRawIntBits(1f) >>> 16);
            for (int i = 0; i < n; i++) {
                view.putShort(2 * i, one);
            }
        } else if (name.endsWith("e_score_correction_bias")) {
            for (int i = 0; i < n; i++) {
                view.putShort(2 * i, (short) 0);
            }
        } else {
            long x = mix(seed * 0x9E3779B97F4A7C15L + name.hashCode() * 0xBF58476D1CE4E5B9L + n);
            int i = 0;
            for (; i + 4 <= n; i += 4) {
                x ^= x << 13;
                x ^= x >>> 7;
                x ^= x << 17;
                long r = x * 0x2545F4914F6CDD1DL; // xorshift64*: the high and low slices are both usable
                long packed = (table[(int) (r & 0xFFFF)] & 0xFFFFL)
                        | (table[(int) ((r >>> 16) & 0xFFFF)] & 0xFFFFL) << 16
                        | (table[(int) ((r >>> 32) & 0xFFFF)] & 0xFFFFL) << 32
                        | (table[(int) (r >>> 48)] & 0xFFFFL) << 48;
                view.putLong(2 * i, packed);
            }
            for (; i < n; i++) {
                x ^= x << 13;
                x ^= x >>> 7;
                x ^= x << 17;
                view.putShort(2 * i, table[(int) ((x * 0x2545F4914F6CDD1DL) >>> 48)]);
            }
        }
        return view.position(0).limit(2 * n).slice().order(ByteOrder.LITTLE_ENDIAN);
    }

    /** SplitMix64's finaliser: a well-spread non-zero xorshift state from any seed. */
    private static long mix(long z) {
        z = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9L;
        z = (z ^ (z >>> 27)) * 0x94D049BB133111EBL;
        z ^= z >>> 31;
        return z == 0 ? 0x9E3779B97F4A7C15L : z;
    }

    /** BF16 bits of {@code std * Φ⁻¹((i + 0.5) / 65536)}, rounded to nearest even. */
    static short[] bf16NormalTable(float std) {
        short[] table = new short[TABLE_SIZE];
        for (int i = 0; i < TABLE_SIZE; i++) {
            float v = (float) (std * inverseNormal((i + 0.5) / TABLE_SIZE));
            int bits = Float.floatToRawIntBits(v);
            bits += 0x7FFF + ((bits >>> 16) & 1);
            table[i] = (short) (bits >>> 16);
        }
        return table;
    }

    /** Φ⁻¹(p) by Acklam's rational approximation (relative error below 1.2e-9), for 0 < p < 1. */
    static double inverseNormal(double p) {
        double[] a = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
            -3.066479806614716e+01, 2.506628277459239e+00};
        double[] b = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
            -1.328068155288572e+01};
        double[] c = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
            4.374664141464968e+00, 2.938163982698783e+00};
        double[] d = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00};
        double low = 0.02425;
        if (p < low) {
            double q = Math.sqrt(-2 * Math.log(p));
            return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
                    / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
        }
        if (p > 1 - low) {
            double q = Math.sqrt(-2 * Math.log(1 - p));
            return -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
                    / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
        }
        double q = p - 0.5;
        double r = q * q;
        return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
                / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
    }

    static String describe(Summary s) {
        return String.format("%,d parameters, %,d bytes in %d shards; largest tensor %s (%,d bytes)", s.parameters(),
                s.bytes(), s.shards(), s.largestTensor(), s.largestTensorBytes());
    }
}
