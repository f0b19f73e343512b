package ai.djl.memopt.safetensors;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.engine.Engine;
import ai.djl.memopt.testing.JavaBuffers;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.pytorch.jni.JniUtils;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class OwnedArraysTest {

    @TempDir Path tmp;

    private static float[] ramp(int n) {
        float[] v = new float[n];
        for (int i = 0; i < n; i++) {
            v[i] = i * 0.5f - 7;
        }
        return v;
    }

    @Test
    void floatsAreCopiedIntoMemoryOfTheArraysOwn() {
        float[] values = ramp(24);
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            NDArray a = OwnedArrays.of(m, values, new Shape(4, 6));
            assertEquals(new Shape(4, 6), a.getShape());
            assertNull(JavaBuffers.of(a));
            values[0] = 99; // a copy, not a view of the Java array
            assertEquals(-7f, a.toFloatArray()[0]);
            NDArray alias = a.toType(DataType.FLOAT32, true);
            a.close();
            assertArrayEquals(ramp(24), alias.toFloatArray(), "an alias outlives the array it was taken from");
        }
    }

    @Test
    void largeArraysAreWrittenWindowByWindow() {
        int n = 1000;
        ByteBuffer data = ByteBuffer.allocate(8 * n).order(ByteOrder.LITTLE_ENDIAN);
        for (int i = 0; i < n; i++) {
            data.putLong(i * 0x1_0000_0001L);
        }
        data.flip();
        List<long[]> windows = new ArrayList<>();
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            // windows of 100 bytes hold 96 bytes: 12 elements, 84 windows, the last one of 4 elements
            NDArray a = OwnedArrays.create(m, new Shape(10, 100), DataType.INT64, (window, offset) -> {
                windows.add(new long[] {offset, window.remaining()});
                ByteBuffer part = data.duplicate().position((int) offset).limit((int) offset + window.remaining());
                window.put(part);
            }, 100);
            assertEquals(84, windows.size());
            assertArrayEquals(new long[] {8 * 996, 32}, windows.get(83));
            long[] got = a.toLongArray();
            for (int i = 0; i < n; i++) {
                assertEquals(i * 0x1_0000_0001L, got[i], "element " + i);
            }
        }
    }

    @Test
    void copiesHeapDirectAndMisalignedMappedBytes() throws IOException {
        // a float at byte 3 of a file: the mapping is not 4-byte aligned
        Path file = tmp.resolve("raw");
        ByteBuffer raw = ByteBuffer.allocate(3 + 16).order(ByteOrder.LITTLE_ENDIAN);
        raw.position(3);
        for (float v : new float[] {1.5f, -2f, 3.25f, 1e-3f}) {
            raw.putFloat(v);
        }
        Files.write(file, raw.array());
        try (FileChannel ch = FileChannel.open(file); NDManager m = NDManager.newBaseManager(Device.cpu())) {
            ByteBuffer mapped = ch.map(FileChannel.MapMode.READ_ONLY, 3, 16);
            ByteBuffer heap = raw.duplicate().position(3);
            ByteBuffer direct = ByteBuffer.allocateDirect(16).put(heap.duplicate()).flip();
            for (ByteBuffer b : new ByteBuffer[] {mapped, heap, direct}) {
                int before = b.position();
                NDArray a = OwnedArrays.copyOf(m, b, new Shape(2, 2), DataType.FLOAT32);
                assertArrayEquals(new float[] {1.5f, -2f, 3.25f, 1e-3f}, a.toFloatArray(), b.toString());
                assertEquals(before, b.position(), "the source buffer is left as it was");
                assertNull(JavaBuffers.of(a));
            }
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> OwnedArrays.copyOf(m, direct, new Shape(5), DataType.FLOAT32));
            assertTrue(e.getMessage().contains("16 bytes for a (5) float32 array, which has 20"), e.getMessage());
        }
    }

    @Test
    void aFailingFillerLeavesNoArrayBehind() {
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            IOException e = assertThrows(IOException.class, () -> OwnedArrays.create(m, new Shape(8),
                    DataType.FLOAT32, (window, offset) -> {
                        throw new IOException("short read");
                    }));
            assertEquals("short read", e.getMessage());
            assertEquals(0, m.getManagedArrays().size(), "the half-filled array was closed");
        }
    }

    @Test
    void copyIntoWritesTheTargetsOwnMemoryEvenOfAParameterThatRequiresGradients() {
        Engine.getEngine("PyTorch"); // loads the native library JniUtils calls
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(true);
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            NDArray target = m.zeros(new Shape(2, 3));
            target.setRequiresGradient(true);
            NDArray view = target.reshape(6); // another handle on target's storage, as a stacked expert is
            NDArray source;
            try (NDManager tmp = m.newSubManager()) {
                source = tmp.create(new float[] {1, 2, 3, 4, 5, 6}, new Shape(2, 3)).toType(DataType.FLOAT16, false);
                OwnedArrays.copyInto(target, source);
            }
            JavaBuffers.overwriteFreedMemory();
            assertNull(JavaBuffers.of(target), "the target still uses its own memory");
            assertArrayEquals(new float[] {1, 2, 3, 4, 5, 6}, view.toFloatArray(), "written in place, converted");
            assertTrue(target.hasGradient());
            assertSame(true, JniUtils.isGradMode(), "the grad mode is restored");
            assertThrows(IllegalArgumentException.class, () -> OwnedArrays.copyInto(target, m.zeros(new Shape(3, 2))));
        } catch (InterruptedException e) {
            throw new AssertionError(e);
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }
}
