package ai.djl.memopt.safetensors;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.pytorch.jni.JniUtils;
import com.google.common.base.Preconditions;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;

/**
 * Arrays filled from Java data whose memory libtorch allocated and owns, as every loader of this project returns them.
 *
 * <p>DJL 0.36's PyTorch engine does not copy Java data into CPU arrays: {@code NDManager.create(Buffer, ...)} (and so
 * {@code create(float[])} and the like) and {@code NDArray.set(Buffer)} make the tensor use the memory of a Java direct
 * buffer ({@code torch::from_blob}), which only that one {@code PtNDArray} keeps reachable. Every other handle on the
 * same memory (a {@code toType} or {@code toDevice} to the same type or device, which returns the same storage even
 * with {@code copy=true}; a reshape, slice or {@code stopGradient}; a tensor autograd saved for the backward pass)
 * dangles once that array is closed or unreachable and the garbage collector frees the buffer: it reads garbage, and
 * writes corrupt malloc's heap. The arrays made here are allocated empty by libtorch ({@code torch::empty}) and written
 * through a view of their own memory ({@code toByteBuffer(true)}, a direct buffer over the tensor's data): one copy from
 * the file mapping or Java array straight into the tensor, no staging buffer, peak memory the tensor itself. On a GPU
 * they are built so on the CPU and copied to the device by the engine.
 *
 * <pre>{@code
 * NDArray w = OwnedArrays.of(manager, values, new Shape(out, in));
 * NDArray x = OwnedArrays.create(manager, shape, DataType.FLOAT32,
 *         (window, offset) -> channel.read(window, fileOffset + offset)); // straight from a file into the tensor
 * OwnedArrays.copyInto(parameter.getArray(), loaded); // in place, where NDArray.set(ByteBuffer) would alias
 * }</pre>
 */
public final class OwnedArrays {

    /** Bytes written through one view: DJL refuses views of 2 GiB or more. */
    static final long WINDOW = 1L << 30;

    private OwnedArrays() {}

    /**
     * Writes the bytes of an array, window by window (each a whole number of elements).
     *
     * @param <E> what filling may throw ({@code IOException} for reads from a file)
     */
    @FunctionalInterface
    public interface Filler<E extends Exception> {
        /**
         * Writes bytes {@code [offset, offset + window.remaining())} of the array, in row-major order, into
         * {@code window} (little-endian, position 0, writable with absolute or relative puts).
         */
        void fill(ByteBuffer window, long offset) throws E;
    }

    /** A new {@code shape} array of {@code type} on {@code manager}'s device, its bytes written by {@code filler}. */
    public static <E extends Exception> NDArray create(NDManager manager, Shape shape, DataType type,
            Filler<E> filler) throws E {
        return create(manager, shape, type, filler, WINDOW);
    }

    static <E extends Exception> NDArray create(NDManager manager, Shape shape, DataType type, Filler<E> filler,
            long window) throws E {
        Preconditions.checkState(ByteOrder.nativeOrder() == ByteOrder.LITTLE_ENDIAN,
                "big-endian hosts are not supported");
        if (manager.getDevice().isGpu()) {
            // the engine's copy to a GPU is the CUDA allocator's memory; build on the CPU first
            try (NDManager host = manager.newSubManager(Device.cpu())) {
                NDArray onHost = create(host, shape, type, filler, window);
                NDArray onDevice = onHost.toDevice(manager.getDevice(), false);
                onDevice.attach(manager);
                return onDevice;
            }
        }
        long bytes = shape.size() * type.getNumOfBytes();
        long step = window - window % 8; // whole elements of every type
        NDArray out = manager.create(shape, type); // torch::empty
        try {
            if (bytes == 0) {
                return out;
            }
            if (bytes <= step) {
                filler.fill(view(out, bytes), 0);
                return out;
            }
            try (NDArray flat = out.reshape(-1)) {
                long elementsPerWindow = step / type.getNumOfBytes();
                for (long first = 0; first < shape.size(); first += elementsPerWindow) {
                    long end = Math.min(shape.size(), first + elementsPerWindow);
                    try (NDArray part = flat.get(new NDIndex("{}:{}", first, end))) {
                        filler.fill(view(part, (end - first) * type.getNumOfBytes()), first * type.getNumOfBytes());
                    }
                }
            }
            return out;
        } catch (Exception | Error e) { // any filler failure: nothing half-written escapes
            out.close();
            throw e;
        }
    }

    /** A direct buffer over the memory of the contiguous CPU array {@code a} (valid while {@code a} is open). */
    private static ByteBuffer view(NDArray a, long bytes) {
        ByteBuffer b = a.toByteBuffer(true);
        if (!b.isDirect() || b.capacity() != bytes) {
            throw new IllegalStateException("the engine gave no direct view of the memory of a " + a.getShape() + " "
                    + a.getDataType() + " array (" + b + "): OwnedArrays needs DJL's PyTorch engine");
        }
        return b.order(ByteOrder.LITTLE_ENDIAN).clear();
    }

    /**
     * A copy of {@code data}'s remaining bytes (little-endian elements in row-major order; heap, direct or memory-mapped)
     * as a new array.
     *
     * @throws IllegalArgumentException if the byte count is not that of {@code shape} and {@code type}
     */
    public static NDArray copyOf(NDManager manager, ByteBuffer data, Shape shape, DataType type) {
        long bytes = shape.size() * type.getNumOfBytes();
        Preconditions.checkArgument(data.remaining() == bytes, "%s bytes for a %s %s array, which has %s", data.remaining(),
                shape, type, bytes);
        int start = data.position();
        return create(manager, shape, type, (window, offset) -> {
            ByteBuffer part = data.duplicate();
            part.limit(Math.toIntExact(start + offset + window.remaining())).position(Math.toIntExact(start + offset));
            window.put(part);
        });
    }

    /** A copy of {@code values} as a new FLOAT32 array. */
    public static NDArray of(NDManager manager, float[] values, Shape shape) {
        Preconditions.checkArgument(values.length == shape.size(), "%s values for shape %s", values.length, shape);
        return create(manager, shape, DataType.FLOAT32,
                (window, offset) -> window.asFloatBuffer().put(values, Math.toIntExact(offset / 4),
                        window.remaining() / 4));
    }

    /**
     * Copies {@code source} into {@code target}'s own memory, converting type and device, outside autograd (a
     * parameter that requires gradients can be written). On CPU, {@code target.set(source.toByteBuffer())} would
     * instead make {@code target} use a Java buffer's memory, which anything else holding {@code target}'s tensor would
     * then read after the collector frees it (and DJL's native {@code torchSet} prints libtorch's deprecation warning
     * for {@code AutoNonVariableTypeMode} on first use; {@code index_put_} here does not).
     *
     * @throws IllegalArgumentException if the shapes differ
     */
    public static void copyInto(NDArray target, NDArray source) {
        Preconditions.checkArgument(target.getShape().equals(source.getShape()),
                "cannot copy a %s array into a %s one", source.getShape(), target.getShape());
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(false);
        NDArray typed = source.toType(target.getDataType(), false); // source itself when the types agree
        try {
            target.set(new NDIndex("..."), typed); // index_put_: a copy into target's storage (and to its device)
        } finally {
            if (typed != source) {
                typed.close();
            }
            JniUtils.setGradMode(gradMode);
        }
    }
}
