package ai.djl.memopt.safetensors;

import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.nio.ByteBuffer;
import java.nio.MappedByteBuffer;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Unmaps a memory mapping as soon as its bytes have been copied, instead of at some later garbage collection: the
 * pages of a mapping that were read count as resident until it is unmapped, so a loader that copied tensor after
 * tensor out of mappings left to the collector held the file twice at its peak (once in the arrays, once in the
 * page-cache pages still mapped).
 *
 * <pre>{@code
 * MappedByteBuffer m = channel.map(READ_ONLY, offset, length);
 * try {
 *     NDArray a = OwnedArrays.copyOf(manager, m, shape, type);
 * } finally {
 *     MappedBuffers.unmap(m); // m, and every view of it, must not be read again
 * }
 * }</pre>
 */
final class MappedBuffers {

    private static final Logger LOG = LoggerFactory.getLogger(MappedBuffers.class);
    private static final Object UNSAFE;
    private static final Method INVOKE_CLEANER;

    static {
        Object unsafe = null;
        Method invokeCleaner = null;
        try {
            Class<?> type = Class.forName("sun.misc.Unsafe");
            Field theUnsafe = type.getDeclaredField("theUnsafe");
            theUnsafe.setAccessible(true);
            unsafe = theUnsafe.get(null);
            invokeCleaner = type.getMethod("invokeCleaner", ByteBuffer.class);
        } catch (ReflectiveOperationException | RuntimeException e) {
            LOG.debug("mappings are left to the garbage collector (no sun.misc.Unsafe.invokeCleaner): {}", e.toString());
        }
        UNSAFE = unsafe;
        INVOKE_CLEANER = invokeCleaner;
    }

    private MappedBuffers() {}

    /**
     * Unmaps {@code buffer} if it is a mapping made by {@code FileChannel.map} (not a slice or duplicate of one);
     * anything else is left to the collector. The caller must hold the only references to it and its views.
     */
    static void unmap(ByteBuffer buffer) {
        if (!(buffer instanceof MappedByteBuffer) || INVOKE_CLEANER == null) {
            return;
        }
        try {
            INVOKE_CLEANER.invoke(UNSAFE, buffer);
        } catch (ReflectiveOperationException | RuntimeException e) {
            // a slice or duplicate (IllegalArgumentException): the collector unmaps it later
            LOG.debug("mapping left to the garbage collector: {}", e.toString());
        }
    }
}
