package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * The Adam moments of one parameter for {@link EightBitAdamW}: either two {@link Quantized} moments (codes and block
 * scales) or two FP32 arrays of the parameter's shape, and the step count. A bucket of parameters
 * ({@link EightBitBuckets}) has one of its own over its flat arrays, and its members' states are views of those.
 */
final class MomentState {

    final Shape shape;
    final boolean quantized;
    long step;
    /** 8-bit moments (quantized) or null. */
    Quantized first;
    Quantized second;
    /** FP32 moments (not quantized) or null. */
    NDArray firstFp32;
    NDArray secondFp32;

    private MomentState(Shape shape, boolean quantized) {
        this.shape = shape;
        this.quantized = quantized;
    }

    /** 8-bit moments over the given arrays (kept, not copied). */
    static MomentState ofQuantized(Shape shape, Quantized first, Quantized second) {
        MomentState s = new MomentState(shape, true);
        s.first = first;
        s.second = second;
        return s;
    }

    /** FP32 moments over the given arrays of {@code shape} (kept, not copied). */
    static MomentState ofFp32(NDArray first, NDArray second) {
        MomentState s = new MomentState(first.getShape(), false);
        s.firstFp32 = first;
        s.secondFp32 = second;
        return s;
    }

    /** Zero moments for {@code weight}, on its device, in {@code manager}. */
    static MomentState fresh(NDArray weight, boolean quantized, int blockSize, NDManager manager,
            BlockwiseCode.OnDevice[] codes) {
        MomentState s = new MomentState(weight.getShape(), quantized);
        long n = weight.size();
        if (quantized) {
            s.first = Quantized.zeros(n, blockSize, BlockwiseCode.signedDynamic(), codes[0], weight, manager);
            s.second = Quantized.zeros(n, blockSize, BlockwiseCode.unsignedDynamic(), codes[1], weight, manager);
        } else {
            s.firstFp32 = manager.zeros(weight.getShape(), DataType.FLOAT32, weight.getDevice());
            s.secondFp32 = manager.zeros(weight.getShape(), DataType.FLOAT32, weight.getDevice());
        }
        return s;
    }

    /** Copies of {@code arrays} (as {@link #arrays()} names them) for {@code weight}, checked. */
    static MomentState restored(String name, Map<String, NDArray> arrays, NDArray weight, boolean quantized,
            int blockSize, NDManager manager, BlockwiseCode.OnDevice[] codes) {
        MomentState s = fresh(weight, quantized, blockSize, manager, codes);
        try {
            if (quantized) {
                s.first.copyFrom(name, EightBitAdamW.EXP_AVG, arrays);
                s.second.copyFrom(name, EightBitAdamW.EXP_AVG_SQ, arrays);
            } else {
                copyInto(s.firstFp32, name, EightBitAdamW.EXP_AVG, arrays, DataType.FLOAT32, quantized);
                copyInto(s.secondFp32, name, EightBitAdamW.EXP_AVG_SQ, arrays, DataType.FLOAT32, quantized);
            }
        } catch (RuntimeException e) {
            s.close();
            throw e;
        }
        return s;
    }

    /**
     * Copies {@code arrays.get(key)} into {@code target} (never keeping the given array: arrays loaded from files sit
     * on buffers that the garbage collector frees once their manager is closed), after checking type and shape.
     */
    private static void copyInto(NDArray target, String name, String key, Map<String, NDArray> arrays,
            DataType type, boolean quantized) {
        NDArray a = arrays.get(key);
        Preconditions.checkArgument(a != null, "optimizer state of %s has no %s (its %s moments need %s)", name, key,
                quantized ? "8-bit" : "FP32", quantized ? "code and absmax arrays" : "exp_avg and exp_avg_sq");
        Preconditions.checkArgument(a.getDataType() == type, "optimizer state %s.%s is %s, expected %s", name, key,
                a.getDataType(), type);
        Preconditions.checkArgument(a.getShape().equals(target.getShape()),
                "optimizer state %s.%s has shape %s, expected %s", name, key, a.getShape(), target.getShape());
        target.set(new NDIndex("..."), a);
    }

    /** Elements {@code [start, start + rows * cols)} of the flat {@code a} as a (rows, cols) view in {@code tmp}. */
    static NDArray piece(NDArray a, long start, long rows, long cols, NDManager tmp) {
        NDArray slice = a;
        if (start != 0 || rows * cols != a.size()) { // the whole array needs no slice
            slice = a.get(new NDIndex("{}:{}", start, start + rows * cols));
            slice.attach(tmp);
        }
        NDArray view = slice.reshape(rows, cols);
        view.attach(tmp);
        return view;
    }

    Map<String, NDArray> arrays() {
        Map<String, NDArray> out = new LinkedHashMap<>();
        if (quantized) {
            first.putInto(out, EightBitAdamW.EXP_AVG);
            second.putInto(out, EightBitAdamW.EXP_AVG_SQ);
        } else {
            out.put(EightBitAdamW.EXP_AVG, firstFp32);
            out.put(EightBitAdamW.EXP_AVG_SQ, secondFp32);
        }
        return out;
    }

    long bytes() {
        long total = 0;
        for (NDArray a : arrays().values()) {
            total += a.size() * a.getDataType().getNumOfBytes();
        }
        return total;
    }

    void close() {
        for (NDArray a : arrays().values()) {
            a.close();
        }
    }

    /** One moment in 8 bits: flat codes (n) UINT8 and one FP32 absolute maximum per block. */
    static final class Quantized {
        final NDArray codes;
        final NDArray absmax;
        final BlockwiseCode.OnDevice code;
        final int blockSize;

        Quantized(NDArray codes, NDArray absmax, BlockwiseCode.OnDevice code, int blockSize) {
            this.codes = codes;
            this.absmax = absmax;
            this.code = code;
            this.blockSize = blockSize;
        }

        /** A zero moment: every code the index of 0, every scale 0. */
        static Quantized zeros(long n, int blockSize, BlockwiseCode table, BlockwiseCode.OnDevice code,
                NDArray like, NDManager manager) {
            long blocks = (n + blockSize - 1) / blockSize;
            NDArray codes = manager.full(new Shape(n), table.zeroIndex(), DataType.UINT8, like.getDevice());
            NDArray absmax = manager.zeros(new Shape(blocks), DataType.FLOAT32, like.getDevice());
            return new Quantized(codes, absmax, code, blockSize);
        }

        /** Views of blocks {@code [b0, b0 + rows)}, each {@code cols} long, for one chunk of an update. */
        Piece piece(long b0, long rows, long cols, NDManager tmp) {
            NDArray c = MomentState.piece(codes, b0 * blockSize, rows, cols, tmp);
            NDArray a = absmax.size() == rows ? absmax : absmax.get(new NDIndex("{}:{}", b0, b0 + rows));
            if (a != absmax) {
                a.attach(tmp);
            }
            return new Piece(c, a);
        }

        /** Codes and scales of some blocks: views that decoding reads and encoding writes. */
        final class Piece {
            private final NDArray codes;
            private final NDArray absmax;

            private Piece(NDArray codes, NDArray absmax) {
                this.codes = codes;
                this.absmax = absmax;
            }

            /** The blocks dequantized: a new (rows, cols) FP32 array in {@code tmp}. */
            NDArray decode(NDManager tmp) {
                NDArray out = code.decode(codes, absmax);
                out.attach(tmp);
                return out;
            }

            /** Stores the (rows, cols) FP32 {@code x} as these blocks: scales, then codes. */
            void encode(NDArray x, NDManager tmp) {
                NDArray scale = BlockwiseCode.OnDevice.absmax(x);
                scale.attach(tmp);
                NDArray q = code.encode(x, scale);
                q.attach(tmp);
                UpdateRules.copyInto(codes, q, tmp);
                UpdateRules.copyInto(absmax, scale, tmp);
            }
        }

        void copyFrom(String name, String moment, Map<String, NDArray> arrays) {
            copyInto(codes, name, moment + EightBitAdamW.CODE, arrays, DataType.UINT8, true);
            copyInto(absmax, name, moment + EightBitAdamW.ABSMAX, arrays, DataType.FLOAT32, true);
        }

        void putInto(Map<String, NDArray> out, String moment) {
            out.put(moment + EightBitAdamW.CODE, codes);
            out.put(moment + EightBitAdamW.ABSMAX, absmax);
        }
    }
}
