package ai.djl.memopt.precision;

import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;

/** Boundary casts of the floating arrays of an {@link NDList}; other types pass through. */
final class Casts {

    private Casts() {}

    /** Casts floating arrays whose type is not {@code to} (and not BF16, which never gets here) to {@code to}. */
    static NDList cast(NDList list, DataType to) {
        NDList out = new NDList(list.size());
        for (NDArray a : list) {
            DataType t = Precisions.checkSupported(a.getDataType());
            if (t.isFloating() && t != to) {
                NDArray c = TypeCasts.cast(a, to);
                c.setName(a.getName());
                out.add(c);
            } else {
                out.add(a);
            }
        }
        return out;
    }

    /**
     * Runs {@code block} with its floating inputs cast to {@code inner} and its floating outputs cast to {@code outer}
     * (left as they are if null), closing the casts that are no longer needed: the forward of a precision boundary.
     */
    static NDList forward(Block block, ParameterStore parameterStore, NDList inputs, boolean training,
            PairList<String, Object> params, DataType inner, DataType outer) {
        NDList in = cast(inputs, inner);
        NDList out = block.forward(parameterStore, in, training, params);
        NDList result = outer == null ? out : cast(out, outer);
        closeTemporaries(in, inputs, out);
        if (result != out) {
            closeTemporaries(out, result, inputs);
        }
        return result;
    }

    /** Closes {@code casted[i]} where it differs from {@code original[i]} (it was replaced), unless it is in {@code keep}. */
    static void closeTemporaries(NDList casted, NDList original, NDList keep) {
        for (int i = 0; i < casted.size(); i++) {
            NDArray c = casted.get(i);
            if (c != original.get(i) && !containsSame(keep, c)) {
                // the autograd graph holds its own reference to what it saved: closing the handle is safe
                c.close();
            }
        }
    }

    private static boolean containsSame(NDList list, NDArray a) {
        for (NDArray x : list) {
            if (x == a) {
                return true;
            }
        }
        return false;
    }
}
