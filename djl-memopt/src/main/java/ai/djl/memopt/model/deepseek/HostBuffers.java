package ai.djl.memopt.model.deepseek;

import ai.djl.ndarray.NDArray;
import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.nio.ByteBuffer;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Releases the Java direct buffer a CPU array was created over, once the array no longer uses it.
 *
 * <p>DJL's PyTorch engine creates CPU arrays from Java direct buffers without copying ({@code from_blob}), and the
 * {@code PtNDArray} keeps a reference to the buffer ({@code dataRef}) until it is closed; {@code NDArray.intern}, which
 * swaps another tensor under the same object, keeps that reference. {@link #release} does what {@code close} does
 * with it (drops the reference) and frees the buffer at once through the JDK's {@code Unsafe.invokeCleaner} instead of
 * at some later garbage collection, so that stacking a model's experts never holds two copies of them. Buffers that
 * are slices of another buffer, or larger than the array, are left to the garbage collector. GPU arrays have no such
 * buffer (the engine copies to the device).
 */
final class HostBuffers {

    private static final Logger LOG = LoggerFactory.getLogger(HostBuffers.class);

    private HostBuffers() {}

    /**
     * Drops and frees the direct buffer behind {@code array}, which must no longer be backed by it (after
     * {@code intern}). Does nothing for arrays without one.
     */
    static void release(NDArray array) {
        Field field = dataRefField(array.getClass());
        if (field == null) {
            return;
        }
        ByteBuffer buffer;
        try {
            buffer = (ByteBuffer) field.get(array);
            field.set(array, null);
        } catch (IllegalAccessException e) {
            LOG.debug("cannot release the host buffer of {}: {}", array.getClass().getName(), e.toString());
            return;
        }
        // only a buffer of exactly the array's size, i.e. made for it (as DJL and the safetensors reader do); a larger
        // one may back other arrays too and is left to the collector
        if (buffer != null && buffer.isDirect()
                && buffer.capacity() == array.size() * array.getDataType().getNumOfBytes()) {
            clean(buffer);
        }
    }

    private static Field dataRefField(Class<?> type) {
        for (Class<?> c = type; c != null; c = c.getSuperclass()) {
            try {
                Field f = c.getDeclaredField("dataRef");
                if (f.getType() != ByteBuffer.class) {
                    return null;
                }
                f.setAccessible(true);
                return f;
            } catch (NoSuchFieldException e) {
                // look in the superclass
            } catch (RuntimeException e) {
                return null;
            }
        }
        return null;
    }

    private static void clean(ByteBuffer buffer) {
        try {
            Class<?> unsafeClass = Class.forName("sun.misc.Unsafe");
            Field theUnsafe = unsafeClass.getDeclaredField("theUnsafe");
            theUnsafe.setAccessible(true);
            Method invokeCleaner = unsafeClass.getMethod("invokeCleaner", ByteBuffer.class);
            invokeCleaner.invoke(theUnsafe.get(null), buffer);
        } catch (ReflectiveOperationException | RuntimeException e) {
            // a slice or duplicate (IllegalArgumentException), or no jdk.unsupported: the collector frees it later
            LOG.debug("host buffer left to the garbage collector: {}", e.toString());
        }
    }
}
