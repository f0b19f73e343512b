package ai.djl.memopt.testing;

import ai.djl.ndarray.NDArray;
import ai.djl.pytorch.engine.PtNDArray;
import java.lang.reflect.Field;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.List;

/**
 * Whether a CPU array's memory is a Java direct buffer or memory that libtorch allocated, as DJL 0.36's PyTorch
 * engine decides it: {@code NDManager.create(Buffer, ...)} and {@code NDArray.set(Buffer)} on CPU make a tensor over
 * the buffer's memory ({@code torch::from_blob}, no copy) and keep the buffer reachable from that one
 * {@code PtNDArray} ({@code dataRef}), not from the tensor. Any other handle on the same storage (a no-op
 * {@code toType}/{@code toDevice} with {@code copy=true}, a reshape, a slice, {@code stopGradient}) then dangles once
 * that array is closed or unreachable and the garbage collector frees the buffer.
 */
public final class JavaBuffers {

    private static final Field DATA_REF;

    static {
        try {
            DATA_REF = PtNDArray.class.getDeclaredField("dataRef");
            DATA_REF.setAccessible(true);
        } catch (NoSuchFieldException e) {
            // the probe must not pass silently on an engine that keeps the buffer elsewhere
            throw new ExceptionInInitializerError("PtNDArray has no field dataRef: re-check how DJL "
                    + "keeps the Java buffers of CPU arrays before trusting JavaBuffers");
        }
    }

    private JavaBuffers() {}

    /** The Java buffer whose memory {@code array} uses, or null when libtorch allocated its memory. */
    public static ByteBuffer of(NDArray array) {
        try {
            return (ByteBuffer) DATA_REF.get(array);
        } catch (IllegalAccessException e) {
            throw new IllegalStateException(e);
        }
    }

    /**
     * Overwrites the Java buffer behind {@code array} with {@code 0x7f} bytes, as malloc's next user does once the
     * collector has freed it; does nothing for an array whose memory libtorch owns.
     *
     * @return whether there was such a buffer
     */
    public static boolean scribble(NDArray array) {
        ByteBuffer b = of(array);
        if (b == null) {
            return false;
        }
        for (int i = 0; i < b.capacity(); i++) {
            b.put(i, (byte) 0x7f);
        }
        return true;
    }

    /**
     * Lets the garbage collector free unreachable direct buffers (their native memory goes back to malloc), then
     * allocates and fills native memory, which malloc hands out from what was just freed.
     */
    public static void overwriteFreedMemory() throws InterruptedException {
        System.gc();
        Thread.sleep(50); // the cleaner thread frees them
        List<ByteBuffer> fill = new ArrayList<>();
        for (int size = 64; size <= 1 << 20; size *= 2) {
            for (int i = 0; i < (size <= 1 << 16 ? 8 : 4); i++) {
                ByteBuffer b = ByteBuffer.allocateDirect(size);
                while (b.hasRemaining()) {
                    b.put((byte) 0x7f);
                }
                fill.add(b);
            }
        }
        fill.clear();
    }
}
