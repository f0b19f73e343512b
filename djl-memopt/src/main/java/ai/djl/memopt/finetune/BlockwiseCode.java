package ai.djl.memopt.finetune;

import ai.djl.Device;
import ai.djl.memopt.nn.Scalars;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.nio.ByteBuffer;
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
 * <p>Nearest-entry search runs with NDArray operations only, so it works on any device. The entry nearest to
 * {@code y = value / absmax} is the number of midpoints between neighbouring entries ("thresholds") below {@code y}.
 * {@link OnDevice#encode} finds it in a dozen element-wise operations instead of an 8-step binary search (six
 * operations a step): a key {@code k = floor(1024 (log2 |y| + 24))}, clamped to {@code [0, 24576]} (and mirrored
 * around 24576 by the sign of {@code y} for the signed code), indexes two tables built here: the lowest index any
 * {@code y} with a key within two of {@code k} can have, and the threshold just above it; one comparison with that
 * threshold then adds 0 or 1. The key is 1/1024 of an octave wide, and the closest thresholds are 0.0076 octave apart
 * (the unsigned code's top decade), so the five keys around any key span at most one threshold (checked when the
 * tables are built): the result is exact whenever the device's {@code log2} is within a key of the exact one (its
 * error is about 1e-6 octave), and equals the binary search ({@link OnDevice#encodeBySearch}, kept as the reference)
 * for every input; tests compare the two on every threshold, its neighbouring floats and millions of random values.
 */
final class BlockwiseCode {

    static final int ENTRIES = 256;
    /** Keys per octave of {@code |y|} in {@link OnDevice#encode}. */
    static final int KEYS_PER_OCTAVE = 1024;
    /** Octaves below 1 that the keys cover; every {@code |y| < 2^-24}, below the first nonzero threshold, gets key 0. */
    static final int OCTAVES = 24;
    /** The key of {@code |y| = 1}; the keys of a magnitude are {@code [0, TOP_KEY]}. */
    static final int TOP_KEY = KEYS_PER_OCTAVE * OCTAVES;
    /** Keys on either side of a key whose magnitudes the tables of that key allow for (the device's rounding). */
    private static final int KEY_MARGIN = 2;

    /** The FP32 powers of ten bitsandbytes scales each decade by ({@code 10 ** (-6 + i)} in Python). */
    private static final double[] DECADES = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1};

    private static final BlockwiseCode SIGNED = new BlockwiseCode(dynamicMap(true));
    private static final BlockwiseCode UNSIGNED = new BlockwiseCode(dynamicMap(false));

    private final float[] values;
    private final float[] thresholds;
    private final boolean signed;
    /** Per key: the lowest index of any value the key can stand for (see the class documentation). */
    private final byte[] keyIndex;
    /** Per key: {@code thresholds[keyIndex + 1]}, +inf past the last entry. */
    private final float[] keyThreshold;

    private BlockwiseCode(float[] values) {
        this.values = values;
        this.thresholds = new float[ENTRIES];
        thresholds[0] = Float.NEGATIVE_INFINITY; // never compared: the search starts at entry 0
        for (int j = 1; j < ENTRIES; j++) {
            thresholds[j] = (float) (((double) values[j - 1] + values[j]) / 2);
        }
        this.signed = values[0] < 0;
        int keys = signed ? 2 * TOP_KEY + 1 : TOP_KEY + 1;
        this.keyIndex = new byte[keys];
        this.keyThreshold = new float[keys];
        for (int c = 0; c < keys; c++) {
            int j = signed ? c - TOP_KEY : c; // signed: the magnitude key, negative for negative values
            double low;
            double high;
            if (j > 0 || !signed) {
                low = lowest(j - KEY_MARGIN);
                high = highest(j + KEY_MARGIN);
            } else if (j < 0) {
                low = -highest(-j + KEY_MARGIN);
                high = -lowest(-j - KEY_MARGIN);
            } else {
                high = highest(KEY_MARGIN);
                low = -high;
            }
            int first = below(low, false);
            int last = below(high, true);
            if (last - first > 1) {
                throw new IllegalStateException("key " + c + " of the " + (signed ? "signed" : "unsigned")
                        + " code spans entries " + first + " to " + last + ": the keys are too coarse");
            }
            keyIndex[c] = (byte) first;
            keyThreshold[c] = first + 1 < ENTRIES ? thresholds[first + 1] : Float.POSITIVE_INFINITY;
        }
    }

    /** The smallest magnitude with key {@code k} ({@code k <= 0}: 0). */
    private static double lowest(int k) {
        return k <= 0 ? 0 : Math.pow(2, (double) k / KEYS_PER_OCTAVE - OCTAVES);
    }

    /** The largest magnitude with key {@code k}, as an upper bound ({@code k >= TOP_KEY}: 1, the largest |y|). */
    private static double highest(int k) {
        return k >= TOP_KEY ? 1 : Math.pow(2, (double) (k + 1) / KEYS_PER_OCTAVE - OCTAVES);
    }

    /** The number of thresholds (from index 1) below {@code y}, or at most {@code y} when {@code inclusive}. */
    private int below(double y, boolean inclusive) {
        int n = 0;
        for (int j = 1; j < ENTRIES; j++) {
            n += thresholds[j] < y || inclusive && thresholds[j] == y ? 1 : 0;
        }
        return n;
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

    /** The index of the entry nearest to {@code y} by a plain search in Java: the tests' reference. */
    int nearest(float y) {
        int n = 0;
        for (int j = 1; j < ENTRIES; j++) {
            n += thresholds[j] < y ? 1 : 0;
        }
        return n;
    }

    /** This code's tables on {@code device}, allocated in {@code manager} (2 KiB, and 5 bytes per key: 123/246 KiB). */
    OnDevice upload(NDManager manager, Device device) {
        return upload(manager, device, false);
    }

    /** {@link #upload}, encoding by the reference search ({@link OnDevice#encodeBySearch}) when {@code bySearch}. */
    OnDevice upload(NDManager manager, Device device, boolean bySearch) {
        NDArray index = onDevice(manager, manager.create(ByteBuffer.wrap(keyIndex), new Shape(keyIndex.length),
                DataType.UINT8), device);
        return new OnDevice(signed, onDevice(manager, manager.create(values), device),
                onDevice(manager, manager.create(thresholds), device), index,
                onDevice(manager, manager.create(keyThreshold), device), bySearch, manager);
    }

    private static NDArray onDevice(NDManager manager, NDArray host, Device device) {
        NDArray there = host.toDevice(device, false);
        if (there != host) {
            host.close();
            there.attach(manager);
        }
        return there;
    }

    /**
     * The entries and midpoints of a code, and its key tables, as arrays on one device, with the scalars that
     * {@link #encode} needs made there once (no operation of an update uploads a number from the host).
     */
    static final class OnDevice {
        private final boolean signed;
        private final boolean bySearch;
        private final NDArray values;
        private final NDArray thresholds;
        private final NDArray keyIndex;
        private final NDArray keyThreshold;
        private final NDList scalars = new NDList();
        private final NDArray minNormal;
        private final NDArray keyScale;
        private final NDArray topKey;
        private final NDArray zero;
        private final NDArray zeroKey;

        private OnDevice(boolean signed, NDArray values, NDArray thresholds, NDArray keyIndex, NDArray keyThreshold,
                boolean bySearch, NDManager manager) {
            this.signed = signed;
            this.bySearch = bySearch;
            this.values = values;
            this.thresholds = thresholds;
            this.keyIndex = keyIndex;
            this.keyThreshold = keyThreshold;
            this.minNormal = scalar(values, Float.MIN_NORMAL, manager);
            this.keyScale = scalar(values, KEYS_PER_OCTAVE, manager);
            this.topKey = scalar(values, TOP_KEY, manager);
            this.zero = scalar(values, 0, manager);
            this.zeroKey = zero.toType(DataType.INT64, false);
            zeroKey.attach(manager);
            scalars.add(zeroKey);
        }

        private NDArray scalar(NDArray like, double value, NDManager manager) {
            NDArray s = Scalars.like(like, value);
            s.attach(manager);
            scalars.add(s);
            return s;
        }

        /** Bytes of the tables. */
        long bytes() {
            return 4L * (values.size() + thresholds.size() + keyThreshold.size()) + keyIndex.size();
        }

        void close() {
            values.close();
            thresholds.close();
            keyIndex.close();
            keyThreshold.close();
            scalars.close();
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
         * The index of the entry nearest to each {@code y = x / absmax} (ties to the lower entry), by the key tables
         * (see the class documentation): 9 element-wise operations (unsigned) or 12 (signed) and two on the scales;
         * temporaries at most about 21 bytes per element at once (the normalized values, an FP32 key and sign, the
         * INT64 key, the gathered threshold).
         *
         * @param x (blocks, block) FP32, {@code |x| <= absmax} row by row (non-negative for the unsigned code)
         * @param absmax (blocks) FP32 as {@link #absmax} gives (rows of zeros get the index of 0)
         * @return (blocks, block) UINT8, in {@code x}'s manager
         */
        NDArray encode(NDArray x, NDArray absmax) {
            if (bySearch) {
                return encodeBySearch(x, absmax);
            }
            NDManager m = x.getManager();
            try (NDManager t = m.newSubManager()) {
                NDArray y = normalized(x, absmax, t);
                NDArray key = key(y, t);
                NDArray above = keyThreshold.take(t, key);
                above.attach(t);
                NDArray below = above.lt(y); // the threshold above the lowest index is below y: one more
                below.attach(t);
                NDArray index = keyIndex.take(t, key); // UINT8
                index.addi(below);
                index.attach(m);
                return index;
            }
        }

        /** {@code x / max(absmax, MIN_NORMAL)} by rows: a zero scale means a block of zeros, mapped to 0. */
        private NDArray normalized(NDArray x, NDArray absmax, NDManager t) {
            NDArray safe = absmax.maximum(minNormal);
            safe.attach(t);
            NDArray column = safe.expandDims(1);
            column.attach(t);
            NDArray y = x.div(column);
            y.attach(t);
            return y;
        }

        /**
         * The INT64 key of each {@code y}: {@code trunc(1024 log2 |y| + 24576)}, at least 0; signed, mirrored around
         * 24576 by the sign. A finite {@code y} is at most 1 in magnitude (it is divided by its block's maximum), so
         * its key is at most the last; the lower bound is applied to the integers, so that a NaN (a moment that
         * overflowed to infinity, divided by its infinite maximum) still gives a valid index: its conversion gives
         * the least INT64 on x86 and 0 on CUDA and ARM, both clamped to 0. An index out of the table would be an
         * exception on the CPU and a device assertion on CUDA.
         */
        private NDArray key(NDArray y, NDManager t) {
            NDArray magnitude = signed ? y.abs() : y;
            NDArray log = magnitude.log2();
            log.attach(t);
            if (magnitude != y) {
                magnitude.close();
            }
            log.muli(keyScale).addi(topKey);
            NDArray wide = log;
            if (signed) {
                wide = log.maximum(zero); // |y| < 2^-24: key 0 before the sign is applied
                wide.attach(t);
                log.close();
                try (NDArray sign = y.sign()) {
                    wide.muli(sign).addi(topKey);
                }
            }
            NDArray raw = wide.toType(DataType.INT64, false);
            raw.attach(t);
            wide.close();
            NDArray key = raw.maximum(zeroKey);
            key.attach(t);
            raw.close();
            return key;
        }

        /**
         * The reference search: the largest {@code j} with {@code thresholds[j] < x / absmax}, by an 8-step binary
         * search of one gather and one comparison per step on the whole array. {@link #encode} gives the same index
         * for every input; tests compare the two.
         */
        NDArray encodeBySearch(NDArray x, NDArray absmax) {
            NDManager m = x.getManager();
            NDArray index;
            try (NDManager t = m.newSubManager()) {
                NDArray normalized = normalized(x, absmax, t);
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
