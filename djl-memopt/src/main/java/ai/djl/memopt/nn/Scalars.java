package ai.djl.memopt.nn;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.types.Shape;

/**
 * Scalar operands for arithmetic on arrays that autograd records.
 *
 * <p>DJL's {@code NDArray.mul(Number)} (and {@code div}, {@code pow}, ...) wraps the number in an array over a Java
 * direct buffer, which PyTorch's CPU {@code from_blob} does not copy, and closes that array at once. Autograd keeps
 * the tensor to compute the backward pass, but nothing keeps the Java buffer alive: after a garbage collection the
 * backward reads freed memory and returns wrong gradients without an error. A scalar made here is allocated by
 * libtorch itself ({@code torch.full}), so autograd's reference is enough.
 *
 * <pre>{@code
 * try (NDArray s = Scalars.like(scores, softmaxScale)) {
 *     scaled = scores.mul(s);
 * }
 * }</pre>
 */
public final class Scalars {

    private Scalars() {}

    /** A 0-dimensional array holding {@code value}, of {@code like}'s type, device and manager (caller closes it). */
    public static NDArray like(NDArray like, double value) {
        Device device = like.getDevice();
        NDArray s = like.getManager().full(new Shape(), (float) value, like.getDataType());
        if (s.getDevice().equals(device)) {
            return s;
        }
        NDArray moved = s.toDevice(device, false);
        s.close();
        return moved;
    }

    /** {@code array * value} with a libtorch-owned scalar (see the class documentation). */
    public static NDArray mul(NDArray array, double value) {
        try (NDArray s = like(array, value)) {
            return array.mul(s);
        }
    }

    /**
     * {@code array + value} with a device-made scalar: besides the autograd hazard above, {@code add(Number)} uploads
     * the number from host memory, which on a GPU waits for the work queued before it.
     */
    public static NDArray add(NDArray array, double value) {
        try (NDArray s = like(array, value)) {
            return array.add(s);
        }
    }
}
