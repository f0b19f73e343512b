package ai.djl.memopt.safetensors;

import com.sun.jna.Function;
import com.sun.jna.NativeLibrary;
import java.nio.file.Path;

/**
 * Linux's {@code renameat2(..., RENAME_EXCHANGE)}, through JNA: swaps two existing paths in one atomic step, which
 * {@link java.nio.file.Files#move} cannot do for a non-empty directory. Where the call does not exist (other C
 * libraries, old kernels) or the file system refuses it, {@link #swap} returns false and the caller falls back.
 */
final class RenameExchange {

    private static final int AT_FDCWD = -100;
    private static final int RENAME_EXCHANGE = 1 << 1;
    private static final Function RENAMEAT2 = lookup();

    private RenameExchange() {}

    private static Function lookup() {
        try {
            return NativeLibrary.getInstance("c").getFunction("renameat2");
        } catch (UnsatisfiedLinkError | RuntimeException e) {
            return null;
        }
    }

    /** Swaps {@code a} and {@code b} atomically; false if this system cannot. */
    static boolean swap(Path a, Path b) {
        if (RENAMEAT2 == null || Boolean.getBoolean("memopt.noRenameExchange")) {
            return false;
        }
        int rc = RENAMEAT2.invokeInt(new Object[] {AT_FDCWD, a.toString(), AT_FDCWD, b.toString(), RENAME_EXCHANGE});
        return rc == 0;
    }
}
