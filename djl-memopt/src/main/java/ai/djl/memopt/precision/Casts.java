package ai.djl.memopt.precision;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.types.DataType;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.Arrays;

/** Boundary casts of the floating arrays of an {@link NDList}; other types pass through. */
final class Casts {

    private Casts() {}

    /** Casts floating arrays whose type is not {@code to} (and not BF16, which never gets here) to {@code to}. */
    static NDList cast(NDList list, DataType to) {
        NDList out = new NDList(list.size());
        for (NDArray a : list) {
            DataType t = Precisions.checkSupported(a.getDataType());
            if (t.isFloating() && t != to) {
                NDArray c = cast(a, to);
                c.setName(a.getName());
                out.add(c);
            } else {
                out.add(a);
            }
        }
        return out;
    }

    /**
     * A cast autograd can differentiate. DJL's {@code toType} runs {@code Tensor.to} under a {@code NoGradGuard}
     * (the result has no {@code grad_fn}: the graph is cut), so with grad mode on the cast is done as a copy into a
     * fresh (uninitialised) array of the target type ({@code index_put_} over full slices, i.e. {@code copy_}), whose
     * backward casts the gradient back to the source type.
     */
    static NDArray cast(NDArray a, DataType to) {
        Precisions.checkSupported(to);
        if (a.getDataType() == to) {
            return a;
        }
        if (!(a instanceof PtNDArray) || !JniUtils.isGradMode()) {
            return a.toType(to, false);
        }
        long[] shape = a.getShape().getShape();
        long[] min = new long[shape.length];
        long[] step = new long[shape.length];
        Arrays.fill(step, 1);
        NDArray out = a.getManager().create(a.getShape(), to, a.getDevice()); // uninitialised: every element is set
        JniUtils.indexSet((PtNDArray) out, (PtNDArray) a, min, shape, step);
        return out;
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
