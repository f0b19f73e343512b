package ai.djl.memopt.safetensors;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Files that the reference implementation (huggingface/safetensors, {@code Metadata::validate} and
 * {@code read_metadata}) refuses, and that this reader must refuse too instead of loading something else than what
 * was written.
 */
class SafetensorsValidationTest {

    @TempDir Path tmp;

    /** A file of {@code header} (padded with spaces to 8 bytes, as the reference writes) and {@code data}. */
    private Path file(String header, byte[] data) throws IOException {
        return file(header.getBytes(StandardCharsets.UTF_8), data);
    }

    private Path file(byte[] header, byte[] data) throws IOException {
        int padded = (header.length + 7) / 8 * 8;
        ByteBuffer b = ByteBuffer.allocate(8 + padded + data.length).order(ByteOrder.LITTLE_ENDIAN);
        b.putLong(padded).put(header);
        for (int i = header.length; i < padded; i++) {
            b.put((byte) ' ');
        }
        b.put(data);
        Path f = Files.createTempFile(tmp, "t", ".safetensors");
        Files.write(f, b.array());
        return f;
    }

    private static String entry(String name, String dtype, long numel, long begin, long end) {
        return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":[" + numel + "],\"data_offsets\":[" + begin
                + "," + end + "]}";
    }

    private static String rejected(Path f) {
        return assertThrows(SafetensorsFormatException.class, () -> SafetensorsFile.open(f)).getMessage();
    }

    @Test
    void contiguousTensorsInAnyHeaderOrderAreAccepted() throws IOException {
        // the reference sorts by offsets: header order does not matter; zero-size tensors take no bytes
        Path f = file("{" + entry("b", "F32", 2, 8, 16) + "," + entry("empty", "F32", 0, 8, 8) + ","
                + entry("a", "F32", 2, 0, 8) + "}", new byte[16]);
        try (SafetensorsFile st = SafetensorsFile.open(f)) {
            assertEquals(3, st.names().size());
        }
    }

    @Test
    void overlappingDataOffsetsAreRejected() throws IOException {
        String m = rejected(file("{" + entry("a", "F32", 4, 0, 16) + "," + entry("b", "F32", 4, 8, 24) + "}",
                new byte[24]));
        assertTrue(m.contains("'b'") && m.contains("overlap") && m.contains("'a'"), m);
    }

    @Test
    void gapsLeadingBytesAndTrailingBytesAreRejected() throws IOException {
        String gap = rejected(file("{" + entry("a", "F32", 2, 0, 8) + "," + entry("b", "F32", 2, 12, 20) + "}",
                new byte[20]));
        assertTrue(gap.contains("'b'") && gap.contains("bytes 8..12"), gap);
        String lead = rejected(file("{" + entry("a", "F32", 2, 4, 12) + "}", new byte[12]));
        assertTrue(lead.contains("'a'") && lead.contains("bytes 0..4"), lead);
        String trailing = rejected(file("{" + entry("a", "F32", 2, 0, 8) + "}", new byte[12]));
        assertTrue(trailing.contains("4 bytes after the last tensor"), trailing);
    }

    @Test
    void duplicateKeysAreRejectedAtEveryLevel() throws IOException {
        String top = rejected(file("{" + entry("w", "F32", 2, 0, 8) + "," + entry("w", "F32", 2, 8, 16) + "}",
                new byte[16]));
        assertTrue(top.contains("duplicate key 'w'"), top);
        String field = rejected(file("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                new byte[8]));
        assertTrue(field.contains("duplicate key 'dtype'"), field);
        String meta = rejected(file("{\"__metadata__\":{\"format\":\"pt\",\"format\":\"np\"}," + entry("w", "F32", 2, 0, 8)
                + "}", new byte[8]));
        assertTrue(meta.contains("duplicate key 'format'"), meta);
    }

    @Test
    void headersMustBeStrictJsonInUtf8() throws IOException {
        String lenient = rejected(file("{'w':{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", new byte[8]));
        assertTrue(lenient.contains("corrupt safetensors header"), lenient);
        String trailing = rejected(file("{" + entry("w", "F32", 2, 0, 8) + "} {}", new byte[8]));
        assertTrue(trailing.contains("corrupt safetensors header"), trailing);
        byte[] header = ("{" + entry("w\u00e9", "F32", 2, 0, 8) + "}").getBytes(StandardCharsets.UTF_8);
        for (int i = 0; i < header.length; i++) {
            if (header[i] == (byte) 0xC3) {
                header[i] = (byte) 0xFF; // not UTF-8
            }
        }
        String utf8 = rejected(file(header, new byte[8]));
        assertTrue(utf8.contains("UTF-8"), utf8);
    }

    @Test
    void nonFiniteValuesNameTheTensorUnlessAllowed() throws IOException {
        ByteBuffer data = ByteBuffer.allocate(24).order(ByteOrder.LITTLE_ENDIAN);
        data.putFloat(1f).putFloat(2f).putFloat(Float.NaN).putFloat(3f); // F32 [4]
        data.putShort(Halfs.floatToF16(1f)).putShort(Halfs.floatToF16(Float.NEGATIVE_INFINITY)); // F16 [2]
        data.putShort(Halfs.floatToBf16(Float.POSITIVE_INFINITY)).putShort(Halfs.floatToBf16(0f)); // BF16 [2]
        Path f = file("{" + entry("f32", "F32", 4, 0, 16) + "," + entry("f16", "F16", 2, 16, 20) + ","
                + entry("bf16", "BF16", 2, 20, 24) + "}", data.array());
        try (SafetensorsFile st = SafetensorsFile.open(f); NDManager m = NDManager.newBaseManager()) {
            String e32 = assertThrows(SafetensorsFormatException.class, () -> st.load(m, "f32")).getMessage();
            assertTrue(e32.contains("tensor 'f32'") && e32.contains("1 NaN") && e32.contains("element 2")
                    && e32.contains(f.toString()), e32);
            String e16 = assertThrows(SafetensorsFormatException.class,
                    () -> st.load(m, "f16", DataType.FLOAT32)).getMessage();
            assertTrue(e16.contains("tensor 'f16'") && e16.contains("1 infinite"), e16);
            String ebf = assertThrows(SafetensorsFormatException.class, () -> st.readFloats("bf16")).getMessage();
            assertTrue(ebf.contains("tensor 'bf16'") && ebf.contains(SafetensorsFile.ALLOW_NON_FINITE), ebf);
            System.setProperty(SafetensorsFile.ALLOW_NON_FINITE, "true");
            try {
                assertTrue(Float.isNaN(st.load(m, "f32").toFloatArray()[2]), "the opt-out loads the values as stored");
                assertArrayEquals(new float[] {Float.POSITIVE_INFINITY, 0f}, st.readFloats("bf16"));
            } finally {
                System.clearProperty(SafetensorsFile.ALLOW_NON_FINITE);
            }
        }
    }

    @Test
    void theWordAtATimeScanFindsEveryPositionInEveryType() throws IOException {
        float[] bad = {Float.NaN, Float.POSITIVE_INFINITY, Float.NEGATIVE_INFINITY};
        for (SafetensorsDType t : new SafetensorsDType[] {SafetensorsDType.F32, SafetensorsDType.F16,
                SafetensorsDType.BF16, SafetensorsDType.F64}) {
            for (int n : new int[] {1, 7, 13}) {
                for (int at = 0; at < n; at++) {
                    ByteBuffer b = ByteBuffer.allocate(n * t.byteSize()).order(ByteOrder.LITTLE_ENDIAN);
                    for (int i = 0; i < n; i++) {
                        // the largest finite values: every exponent bit but one set
                        float v = i == at ? bad[(at + n) % 3] : (i % 2 == 0 ? 65504f : -1.0e-3f);
                        switch (t) {
                            case F32: b.putFloat(v); break;
                            case F16: b.putShort(Halfs.floatToF16(v)); break;
                            case BF16: b.putShort(Halfs.floatToBf16(v)); break;
                            default: b.putDouble(v);
                        }
                    }
                    b.flip();
                    String m = assertThrows(SafetensorsFormatException.class,
                            () -> NonFiniteValues.check(tmp, "t", t, b)).getMessage();
                    assertTrue(m.contains("first at element " + at + ":"), t + " " + n + " " + at + ": " + m);
                    b.put(at * t.byteSize() + t.byteSize() - 1, (byte) 0); // clears the sign and top exponent bits
                    NonFiniteValues.check(tmp, "t", t, b);
                }
            }
        }
    }

    /** Makes a FIFO, or skips the test where the system has no mkfifo. */
    private static Path fifo(Path p) throws IOException, InterruptedException {
        Process mk;
        try {
            mk = new ProcessBuilder("mkfifo", p.toString()).redirectErrorStream(true).start();
        } catch (IOException e) {
            Assumptions.abort("no mkfifo: " + e.getMessage());
            throw e;
        }
        Assumptions.assumeTrue(mk.waitFor(30, TimeUnit.SECONDS) && mk.exitValue() == 0, "mkfifo failed");
        return p;
    }

    /** Runs {@code open} on another thread; a FIFO's open blocks until a writer comes, so unblock it if it hangs. */
    private static String refusedWithoutHanging(Path fifo, ThrowingRunnable open) throws Exception {
        CompletableFuture<Throwable> outcome = CompletableFuture.supplyAsync(() -> {
            try {
                open.run();
                return null;
            } catch (Throwable t) {
                return t;
            }
        });
        Throwable t;
        try {
            t = outcome.get(20, TimeUnit.SECONDS);
        } catch (java.util.concurrent.TimeoutException e) {
            // opening the FIFO read-write counts as a writer and releases the blocked reader
            try (FileChannel ignored = FileChannel.open(fifo, StandardOpenOption.READ, StandardOpenOption.WRITE)) {
                outcome.get(20, TimeUnit.SECONDS);
            }
            throw new AssertionError("opening " + fifo + " blocked instead of refusing a non-regular file");
        }
        assertTrue(t instanceof IOException, String.valueOf(t));
        return t.getMessage();
    }

    private interface ThrowingRunnable {
        void run() throws Exception;
    }

    @Test
    void aFifoIsRefusedInsteadOfBlocking() throws Exception {
        Path dir = Files.createDirectories(tmp.resolve("model"));
        Path weights = fifo(dir.resolve("model.safetensors"));
        String m = refusedWithoutHanging(weights, () -> SafetensorsFile.open(weights).close());
        assertTrue(m.contains(weights.toString()) && m.contains("not a regular file"), m);
        m = refusedWithoutHanging(weights, () -> HfCheckpoint.open(dir).close());
        assertTrue(m.contains("not a regular file"), m);
        Files.delete(weights);
        Path index = fifo(dir.resolve(HfCheckpoint.INDEX_FILE));
        m = refusedWithoutHanging(index, () -> HfCheckpoint.open(dir).close());
        assertTrue(m.contains(index.toString()) && m.contains("not a regular file"), m);
        Files.delete(index);
        Files.createDirectories(dir.resolve("model.safetensors"));
        m = refusedWithoutHanging(weights, () -> HfCheckpoint.open(dir).close());
        assertTrue(m.contains("not a regular file") && m.contains("directory"), m);
    }

    @Test
    void shardPathsOutsideTheDirectoryAreRefusedNotMissing() throws IOException {
        Path dir = Files.createDirectories(tmp.resolve("sharded"));
        try (NDManager m = NDManager.newBaseManager()) {
            new SafetensorsWriter().add("a", m.ones(new ai.djl.ndarray.types.Shape(2))).write(tmp.resolve("outside.safetensors"));
        }
        for (String shard : new String[] {"../outside.safetensors", tmp.resolve("outside.safetensors").toString()}) {
            Files.writeString(dir.resolve(HfCheckpoint.INDEX_FILE), "{\"weight_map\":{\"a\":\""
                    + shard.replace("\\", "\\\\") + "\"}}");
            String msg = assertThrows(SafetensorsFormatException.class, () -> HfCheckpoint.open(dir)).getMessage();
            assertTrue(msg.contains("refused") && msg.contains(shard) && !msg.contains("does not exist"), msg);
        }
        Files.writeString(dir.resolve(HfCheckpoint.INDEX_FILE), "{\"weight_map\":{\"a\":\"x.safetensors\","
                + "\"a\":\"y.safetensors\"}}");
        String dup = assertThrows(SafetensorsFormatException.class, () -> HfCheckpoint.open(dir)).getMessage();
        assertTrue(dup.contains("duplicate key 'a'"), dup);
        assertFalse(Files.exists(dir.resolve("x.safetensors")));
    }
}
