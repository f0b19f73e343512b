package ai.djl.memopt.memory;

import com.sun.jna.Function;
import com.sun.jna.NativeLibrary;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Gives memory that the C allocator holds after tensors were freed back to the operating system.
 *
 * <p>On CPU, libtorch allocates through the C library's {@code malloc}. glibc keeps small freed blocks (below its mmap
 * threshold, 128 KiB by default) in its arenas, where they stay resident: after a training step, the tensors of the
 * step and the C++ objects of its autograd graph leave tens of MB of free but resident memory behind (measured on the
 * {@code bench-small} preset: about 33 MiB after the first FP16 step). {@code malloc_trim(0)} returns it. On other C
 * libraries (musl, macOS, Windows) the call does not exist and {@link #releaseFreed()} does nothing; GPU memory is
 * not concerned.
 *
 * <pre>{@code
 * tuner.step(batch);              // FineTuner calls it after every step on CPU
 * NativeMemory.releaseFreed();    // or by hand, e.g. after an evaluation pass
 * }</pre>
 */
public final class NativeMemory {

    private static final Logger LOG = LoggerFactory.getLogger(NativeMemory.class);
    private static final Function MALLOC_TRIM = lookup();

    private NativeMemory() {}

    private static Function lookup() {
        try {
            return NativeLibrary.getInstance("c").getFunction("malloc_trim");
        } catch (UnsatisfiedLinkError | RuntimeException e) {
            LOG.debug("malloc_trim is not available ({}); NativeMemory.releaseFreed() does nothing", e.toString());
            return null;
        }
    }

    /** Whether this C library can release freed memory on request (glibc). */
    public static boolean isSupported() {
        return MALLOC_TRIM != null;
    }

    /**
     * Returns the allocator's free memory to the operating system ({@code malloc_trim(0)} on glibc; a few milliseconds).
     *
     * @return whether memory was released (false where unsupported, or when there was nothing to release)
     */
    public static boolean releaseFreed() {
        return MALLOC_TRIM != null && MALLOC_TRIM.invokeInt(new Object[] {0}) == 1;
    }
}
