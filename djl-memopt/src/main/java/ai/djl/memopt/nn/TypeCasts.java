package ai.djl.memopt.nn;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.types.DataType;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.Arrays;

/**
 * Floating-point casts that autograd differentiates, and the one guard against BF16. Models, adapters and the
 * mixed-precision decorators all cast through here.
 *
 * <p>DJL 0.36's {@code NDArray.toType} runs {@code Tensor.to} under a {@code NoGradGuard}: its result has no
 * {@code grad_fn}, so a {@code toType} inside a training forward silently cuts the graph (nothing before it gets a
 * gradient). {@link #cast} is {@code toType} with grad mode off; with it on, a copy into a fresh array of the target
 * type, left uninitialised since every element is set ({@code index_put_} over full slices, i.e. {@code copy_}),
 * whose backward casts the gradient back.
 *
 * <pre>{@code
 * NDArray x32 = TypeCasts.cast(x, DataType.FLOAT32); // (B, T, H) FP16 -> FP32, gradients flow back as FP16
 * }</pre>
 */
public final class TypeCasts {

    /** Why BF16 is refused everywhere. */
    public static final String BF16_MESSAGE =
            "BF16 is not supported: DJL 0.36's PyTorch engine aborts the JVM on BFLOAT16; use FP16";

    private TypeCasts() {}

    /**
     * {@code array} in {@code type} (itself if it already is), differentiable (see the class documentation).
     *
     * @throws UnsupportedOperationException for BF16
     */
    public static NDArray cast(NDArray array, DataType type) {
        checkSupported(type);
        if (array.getDataType() == type) {
            return array;
        }
        if (!(array instanceof PtNDArray) || !JniUtils.isGradMode()) {
            return array.toType(type, false);
        }
        long[] shape = array.getShape().getShape();
        long[] min = new long[shape.length];
        long[] step = new long[shape.length];
        Arrays.fill(step, 1);
        NDArray out = array.getManager().create(array.getShape(), type, array.getDevice()); // uninitialised: all set
        JniUtils.indexSet((PtNDArray) out, (PtNDArray) array, min, shape, step);
        return out;
    }

    /**
     * Rejects {@link DataType#BFLOAT16} before it reaches DJL.
     *
     * @return {@code type}
     * @throws UnsupportedOperationException for BF16
     */
    public static DataType checkSupported(DataType type) {
        if (type == DataType.BFLOAT16) {
            throw new UnsupportedOperationException(BF16_MESSAGE);
        }
        return type;
    }
}
