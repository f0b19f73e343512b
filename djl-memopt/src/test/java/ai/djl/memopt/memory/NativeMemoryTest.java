package ai.djl.memopt.memory;

import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;

class NativeMemoryTest {

    @Test
    void freedSmallTensorsAreGivenBackToTheSystem() {
        assumeTrue(NativeMemory.isSupported(), "glibc only");
        try (NDManager m = NDManager.newBaseManager()) {
            m.ones(new Shape(1)).close(); // engine loaded before the baseline
            NativeMemory.releaseFreed();
            long before = MemoryStats.residentBytes();
            // 24,000 tensors of 4 KiB: below glibc's mmap threshold, so they live in its arenas
            List<NDArray> arrays = new ArrayList<>();
            for (int i = 0; i < 24_000; i++) {
                arrays.add(m.ones(new Shape(1024)));
            }
            long filled = MemoryStats.residentBytes();
            arrays.forEach(NDArray::close);
            long freed = MemoryStats.residentBytes();
            assertTrue(NativeMemory.releaseFreed(), "something to release");
            long released = MemoryStats.residentBytes();
            String figures = String.format("RSS before %d, filled %d, after close %d, after release %d MiB",
                    before >> 20, filled >> 20, freed >> 20, released >> 20);
            assertTrue(filled - before > 80L << 20, figures);
            // closing alone leaves most of it resident (measured: all 125 MiB); releasing gives most of it back
            // (measured: 24 MiB left, some of it the Java objects of the arrays)
            assertTrue(freed - before > 60L << 20, figures);
            assertTrue(released - before < 50L << 20, figures);
        }
    }
}
