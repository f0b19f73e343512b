package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import com.google.common.base.Preconditions;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * The state {@link StatefulOptimizer} keeps for one parameter under Adam, AdamW or SGD: the step count and the FP32
 * moments ({@code exp_avg} and {@code exp_avg_sq}) or SGD's {@code momentum_buffer}, as training checkpoints name them
 * ({@link #arrays}) and restore them ({@link #restored}). {@link AdamBuckets} may make the moments pieces of a flat
 * bucket array.
 */
final class OptimizerState {

    long step;
    /** exp_avg (Adam, AdamW) or momentum_buffer (SGD), null until the first update needs it. */
    NDArray first;
    /** exp_avg_sq (Adam, AdamW), else null. */
    NDArray second;

    /** The state arrays by the names checkpoints use (empty before the first moment exists). */
    Map<String, NDArray> arrays(boolean sgd) {
        Map<String, NDArray> out = new LinkedHashMap<>();
        if (first == null) {
            return out;
        }
        if (sgd) {
            out.put("momentum_buffer", first);
        } else {
            out.put("exp_avg", first);
            out.put("exp_avg_sq", second);
        }
        return out;
    }

    /**
     * The state of a parameter restored from {@code arrays} (named as {@link #arrays} names them), copied into new
     * FP32 arrays of {@code manager}.
     *
     * @param needed whether the state must hold moments (a step was taken, and for SGD momentum is on)
     * @throws IllegalArgumentException naming the parameter and the missing or misshaped array
     */
    static OptimizerState restored(String name, long step, Map<String, NDArray> arrays, NDArray weight, boolean sgd,
            boolean needed, NDManager manager) {
        OptimizerState s = new OptimizerState();
        s.step = step;
        String[] keys = sgd ? new String[] {"momentum_buffer"} : new String[] {"exp_avg", "exp_avg_sq"};
        if (needed) {
            for (int i = 0; i < keys.length; i++) {
                NDArray a = arrays.get(keys[i]);
                Preconditions.checkArgument(a != null, "optimizer state of %s has no %s (step %s)", name, keys[i], step);
                Preconditions.checkArgument(a.getShape().equals(weight.getShape()),
                        "optimizer state %s.%s has shape %s, the parameter %s", name, keys[i], a.getShape(),
                        weight.getShape());
                // a copy into memory of this optimizer's own: toType(FLOAT32, true) of an FP32 array is an alias in
                // DJL's PyTorch engine, and the arrays a restore gets are loaded over Java direct buffers that the
                // garbage collector frees once their manager is closed (later updates wrote into freed memory)
                NDArray copy = manager.zeros(weight.getShape(), DataType.FLOAT32, weight.getDevice());
                copy.set(new NDIndex("..."), a);
                if (i == 0) {
                    s.first = copy;
                } else {
                    s.second = copy;
                }
            }
        }
        return s;
    }

    /** Bytes held by the state arrays. */
    long bytes() {
        return bytes(first) + bytes(second);
    }

    private static long bytes(NDArray a) {
        return a == null ? 0 : a.size() * a.getDataType().getNumOfBytes();
    }

    void close() {
        if (first != null) {
            first.close();
        }
        if (second != null) {
            second.close();
        }
    }
}
