package ai.djl.memopt.nn;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.util.concurrent.CompletableFuture;
import org.junit.jupiter.api.Test;

class HostReadsTest {

    @Test
    void readsConvertToLongsAndAreCountedPerThread() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            long before = HostReads.count();
            NDArray ids = m.create(new long[] {3, 1, 4});
            assertArrayEquals(new long[] {3, 1, 4}, HostReads.longs(ids));
            assertEquals(before + 1, HostReads.count());
            // another type is converted on the device, the input left open
            NDArray ints = m.create(new int[] {2, 7});
            assertArrayEquals(new long[] {2, 7}, HostReads.longs(ints));
            assertEquals(DataType.INT32, ints.getDataType());
            assertArrayEquals(new long[] {2, 7}, HostReads.longs(ints));
            assertEquals(before + 3, HostReads.count());
            assertArrayEquals(new long[] {3, 1, 4}, ids.toLongArray(), "the INT64 input was not closed");
            // a read on another thread counts there, not here
            long elsewhere = CompletableFuture.supplyAsync(() -> {
                long start = HostReads.count();
                HostReads.longs(ids);
                return HostReads.count() - start;
            }).get();
            assertEquals(1, elsewhere);
            assertEquals(before + 3, HostReads.count());
        }
    }
}
