package ai.djl.memopt.nn;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.types.DataType;

/**
 * The one way the inference path and the mixture-of-experts dispatch copy device arrays to the host. On a GPU every
 * such copy waits for all queued work (a host synchronisation), so the code that must stay sync-free routes its reads
 * through here, and a per-thread counter lets tests assert how many happened (for example exactly one per sampled
 * decoding step, none inside the model).
 *
 * <pre>{@code
 * long before = HostReads.count();
 * long[] ids = HostReads.longs(chosen); // (B) INT64 on the host
 * assert HostReads.count() == before + 1;
 * }</pre>
 */
public final class HostReads {

    private static final ThreadLocal<long[]> COUNT = ThreadLocal.withInitial(() -> new long[1]);

    private HostReads() {}

    /** The array's values as INT64 on the host (converted on the device first); counts one read. */
    public static long[] longs(NDArray array) {
        COUNT.get()[0]++;
        try (PhaseTimer.Phase p = PhaseTimer.phase("host reads")) {
            if (array.getDataType() == DataType.INT64) {
                return array.toLongArray();
            }
            try (NDArray converted = array.toType(DataType.INT64, false)) {
                return converted.toLongArray();
            }
        }
    }

    /**
     * Counts {@code n} reads that native code made for the calling thread (the TorchScript decode step's sorted
     * dispatch reads its expert counts inside the script).
     */
    public static void recordNative(int n) {
        COUNT.get()[0] += n;
    }

    /** Device-to-host reads made through this class by the calling thread so far. */
    public static long count() {
        return COUNT.get()[0];
    }
}
