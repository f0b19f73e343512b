package ai.djl.memopt.finetune;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.util.Arrays;

/**
 * A sorted 256-entry code for 8-bit block-wise quantization, and the quantization itself: a block of values is stored
 * as its absolute maximum (one FP32 scale) and, per element, the index (UINT8) of the code entry nearest to
 * {@code value / absmax}.
 *
 * <p>The codes are bitsandbytes' {@code create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)} (the "dynamic
 * tree" data type of Dettmers 2016, used by Dettmers et al. 2022 for 8-bit optimizers), rebuilt here value for value
 * in FP32: for each decade {@code i = 0..6}, the midpoints of {@code linspace(0.1, 1, k_i + 1)} (FP32, PyTorch's
 * two-ended formula) times {@code 10^(i-6)}, with {@code k_i = 2^i} positive and as many negative entries when signed
 * and {@code k_i = 2^(i+1)} positive entries when unsigned, plus 0 and 1. Each decade below 1 thus keeps some
 * entries, so values that are tiny relative to their block's maximum keep their magnitude instead of rounding to 0 as
 * on a linear grid. The signed code (first moment) runs from -0.99296875 to 1; the unsigned one (second moment, never
 * negative) spends the sign bit on twice the entries per decade.
 *
 * <p>Nearest-entry search runs with NDArray operations only, so it works on any device: an 8-step binary search over
 * the 255 midpoints between neighbouring entries, each step one gather ({@code take}) and one comparison on the whole
 * chunk, so temporaries stay a few times the chunk's size whatever the code.
 */
final class BlockwiseCode {

    static final int ENTRIES = 256;

    /** The FP32 powers of ten bitsandbytes scales each decade by ({@code 10 ** (-6 + i)} in Python). */
    private static final double[] DECADES = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1};

    private static final BlockwiseCode SIGNED = new BlockwiseCode(dynamicMap(true));
    private static final BlockwiseCode UNSIGNED = new BlockwiseCode(dynamicMap(false));

    private final float[] values;
    private final float[] thresholds;

    private BlockwiseCode(float[] values) {
        this.values = values;
        this.thresholds = new float[ENTRIES];
        thresholds[0] = Float.NEGATIVE_INFINITY; // never compared: the search starts at entry 0
        for (int j = 1; j < ENTRIES; j++) {
            thresholds[j] = (float) (((double) values[j - 1] + values[j]) / 2);
        }
    }

    /** The signed dynamic code, for the first moment. */
    static BlockwiseCode signedDynamic() {
        return SIGNED;
    }

    /** The unsigned dynamic code, for the second moment. */
    static BlockwiseCode unsignedDynamic() {
        return UNSIGNED;
    }

    /** The 256 entries, ascending (a copy). */
    float[] values() {
        return values.clone();
    }

    /** The index of the entry that stores 0 (127 signed, 0 unsigned): the code of a zero-initialised moment. */
    int zeroIndex() {
        int i = Arrays.binarySearch(values, 0f);
        while (i > 0 && values[i - 1] == 0f) {
            i--;
        }
        return i;
    }

    /**
     * {@code create_dynamic_map(signed, 7, 8)}: the entries in ascending order, as FP32 values computed the way
     * PyTorch computes them (FP32 linspace, FP32 midpoints, FP32 product with the decade).
     */
    static float[] dynamicMap(boolean signed) {
        float[] data = new float[ENTRIES];
        int n = 0;
        for (int i = 0; i < DECADES.length; i++) {
            int items = signed ? (1 << i) + 1 : (1 << (i + 1)) + 1; // boundaries; items - 1 midpoints
            float[] b = linspace(0.1f, 1f, items);
            float scale = (float) DECADES[i];
            for (int k = 0; k + 1 < items; k++) {
                float mean = (b[k] + b[k + 1]) / 2f;
                data[n++] = scale * mean;
                if (signed) {
                    data[n++] = -scale * mean;
                }
            }
        }
        data[n++] = 0f;
        data[n++] = 1f;
        if (n != ENTRIES) {
            throw new IllegalStateException("dynamic map has " + n + " entries, expected " + ENTRIES);
        }
        Arrays.sort(data);
        return data;
    }

    /** {@code torch.linspace(start, end, steps)} in FP32: the first half counted from start, the rest from end. */
    static float[] linspace(float start, float end, int steps) {
        float[] out = new float[steps];
        if (steps == 1) {
            out[0] = start;
            return out;
        }
        float step = (end - start) / (steps - 1);
        int halfway = steps / 2;
        for (int i = 0; i < steps; i++) {
            out[i] = i < halfway ? start + step * i : end - step * (steps - i - 1);
        }
        return out;
    }

    /** This code's tables on {@code device}, allocated in {@code manager} (2 KiB). */
    OnDevice upload(NDManager manager, Device device) {
        return new OnDevice(onDevice(manager, values, device), onDevice(manager, thresholds, device));
    }

    private static NDArray onDevice(NDManager manager, float[] data, Device device) {
        NDArray host = manager.create(data);
        NDArray there = host.toDevice(device, false);
        if (there != host) {
            host.close();
            there.attach(manager);
        }
        return there;
    }

    /** The entries and midpoints of a code as arrays on one device. */
    static final class OnDevice {
        private final NDArray values;
        private final NDArray thresholds;

        private OnDevice(NDArray values, NDArray thresholds) {
            this.values = values;
            this.thresholds = thresholds;
        }

        /** Bytes of the two tables. */
        long bytes() {
            return 4L * (values.size() + thresholds.size());
        }

        void close() {
            values.close();
            thresholds.close();
        }

        /**
         * The absolute maximum of each row of {@code x}: the scale of each block.
         *
         * @param x (blocks, block) FP32
         * @return (blocks) FP32, in {@code x}'s manager
         */
        static NDArray absmax(NDArray x) {
            try (NDArray abs = x.abs()) {
                return abs.max(new int[] {1});
            }
        }

        /**
         * The index of the entry nearest to each {@code x / absmax}.
         *
         * @param x (blocks, block) FP32
         * @param absmax (blocks) FP32 as {@link #absmax} gives (rows of zeros get the index of 0)
         * @return (blocks, block) UINT8, in {@code x}'s manager
         */
        NDArray encode(NDArray x, NDArray absmax) {
            NDManager m = x.getManager();
            NDArray index;
            // a zero scale means a block of zeros: any positive divisor maps it to 0
            try (NDArray safe = absmax.maximum(Float.MIN_NORMAL);
                    NDArray column = safe.expandDims(1);
                    NDArray normalized = x.div(column)) {
                index = m.zeros(x.getShape(), DataType.INT64, x.getDevice());
                // largest j with thresholds[j] < normalized: entry j is the nearest (thresholds[0] = -inf)
                for (int step = ENTRIES / 2; step >= 1; step >>= 1) {
                    try (NDArray candidate = index.add(step);
                            NDArray threshold = thresholds.take(m, candidate);
                            NDArray below = threshold.lt(normalized);
                            NDArray increment = below.toType(DataType.INT64, false)) {
                        index.addi(increment.muli(step));
                    }
                }
            }
            try (NDArray wide = index) {
                return wide.toType(DataType.UINT8, false);
            }
        }

        /**
         * The values that {@code codes} and {@code absmax} stand for.
         *
         * @param codes (blocks, block) UINT8
         * @param absmax (blocks) FP32
         * @return (blocks, block) FP32, in {@code codes}' manager
         */
        NDArray decode(NDArray codes, NDArray absmax) {
            NDManager m = codes.getManager();
            try (NDArray index = codes.toType(DataType.INT64, false);
                    NDArray normalized = values.take(m, index);
                    NDArray column = absmax.expandDims(1)) {
                return normalized.mul(column);
            }
        }
    }
}
