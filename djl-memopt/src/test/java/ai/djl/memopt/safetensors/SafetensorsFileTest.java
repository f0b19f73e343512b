package ai.djl.memopt.safetensors;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class SafetensorsFileTest {

    static final Path FIXTURE = Path.of("src/test/resources/fixtures/tiny-deepseek-v3/model.safetensors");

    @TempDir Path tmp;

    @Test
    void readsTransformersCheckpointHeaderAndData() throws IOException {
        try (SafetensorsFile f = SafetensorsFile.open(FIXTURE); NDManager m = NDManager.newBaseManager()) {
            TensorInfo emb = f.info("model.embed_tokens.weight");
            assertEquals(SafetensorsDType.F32, emb.dtype());
            assertArrayEquals(new long[] {512, 64}, emb.shape());
            NDArray a = f.load(m, "model.embed_tokens.weight");
            assertEquals(new Shape(512, 64), a.getShape());
            float[] viaJava = f.readFloats("model.embed_tokens.weight");
            assertArrayEquals(viaJava, a.toFloatArray());
            // the bytes are those of the file: compare one value read independently
            ByteBuffer raw = f.bytes("model.embed_tokens.weight");
            assertEquals(raw.getFloat(4 * 100), viaJava[100]);
            assertTrue(f.names().contains("lm_head.weight"));
        }
    }

    @Test
    void writerRoundTripsEveryTypeAndMetadata() throws IOException {
        Path file = tmp.resolve("t.safetensors");
        try (NDManager m = NDManager.newBaseManager()) {
            NDArray f32 = m.randomNormal(new Shape(3, 5));
            NDArray f16 = f32.toType(DataType.FLOAT16, false);
            NDArray i64 = m.create(new long[] {0, 1, 2, Long.MAX_VALUE, -5});
            NDArray u8 = m.create(new byte[] {0, 1, (byte) 255}).toType(DataType.UINT8, false);
            new SafetensorsWriter().add("a", f32).add("b", f16).add("c", i64).add("d", u8)
                    .putMetadata("format", "pt").write(file);
            try (SafetensorsFile f = SafetensorsFile.open(file)) {
                assertEquals(Map.of("format", "pt"), f.metadata());
                assertArrayEquals(f32.toFloatArray(), f.load(m, "a").toFloatArray());
                NDArray b = f.load(m, "b");
                assertEquals(DataType.FLOAT16, b.getDataType());
                assertArrayEquals(f16.toType(DataType.FLOAT32, false).toFloatArray(), f.readFloats("b"));
                assertArrayEquals(i64.toLongArray(), f.load(m, "c").toLongArray());
                assertArrayEquals(u8.toUint8Array(), f.load(m, "d").toUint8Array());
                assertEquals(0, f.dataStart() % 8, "data section is 8-byte aligned");
            }
        }
        try (var files = Files.list(tmp)) {
            assertEquals(List.of(file), files.toList(), "no temporary file left behind");
        }
    }

    @Test
    void bf16IsConvertedInJavaNeverHandedToDjl() throws IOException {
        float[] values = {1.0f, -2.5f, 3.1415927f, 1e-3f, 65504f, -0.0f};
        ByteBuffer buf = ByteBuffer.allocate(2 * values.length).order(ByteOrder.LITTLE_ENDIAN);
        for (float v : values) {
            buf.putShort(Halfs.floatToBf16(v));
        }
        buf.flip();
        Path file = tmp.resolve("bf16.safetensors");
        new SafetensorsWriter().add("w", SafetensorsDType.BF16, new long[] {2, 3}, buf).write(file);
        try (SafetensorsFile f = SafetensorsFile.open(file); NDManager m = NDManager.newBaseManager()) {
            NDArray a = f.load(m, "w");
            assertEquals(DataType.FLOAT32, a.getDataType());
            float[] got = a.toFloatArray();
            for (int i = 0; i < values.length; i++) {
                // bf16 keeps 8 significant bits: relative error below 2^-8
                assertEquals(values[i], got[i], Math.abs(values[i]) * 0x1p-8f, "element " + i);
            }
            assertEquals(3.140625f, got[2], 0f, "round to nearest even of pi in bf16");
            NDArray h = f.load(m, "w", DataType.FLOAT16);
            assertEquals(DataType.FLOAT16, h.getDataType());
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> f.load(m, "w", DataType.BFLOAT16));
            assertTrue(e.getMessage().contains("aborts the JVM"), e.getMessage());
        }
    }

    @Test
    void halfPrecisionConversionsAreExact() {
        for (int bits = 0; bits < 0x10000; bits++) {
            short h = (short) bits;
            float f = Halfs.f16ToFloat(h);
            if (Float.isNaN(f)) {
                assertTrue(Float.isNaN(Halfs.f16ToFloat(Halfs.floatToF16(f))));
            } else {
                assertEquals(h, Halfs.floatToF16(f), "f16 bits " + Integer.toHexString(bits));
            }
        }
        assertEquals(Float.POSITIVE_INFINITY, Halfs.f16ToFloat(Halfs.floatToF16(70000f)));
        assertEquals(5.9604645e-8f, Halfs.f16ToFloat((short) 1), 0f, "smallest subnormal");
        // ties to even: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10
        assertEquals(1.0f, Halfs.f16ToFloat(Halfs.floatToF16(1f + 0x1p-11f)), 0f);
    }

    @Test
    void truncatedFileNamesTheTensorAndTheFile() throws IOException {
        byte[] bytes = Files.readAllBytes(FIXTURE);
        Path cut = tmp.resolve("cut.safetensors");
        Files.write(cut, Arrays.copyOf(bytes, bytes.length - 100));
        SafetensorsFormatException e = assertThrows(SafetensorsFormatException.class, () -> SafetensorsFile.open(cut));
        assertTrue(e.getMessage().contains(cut.toString()), e.getMessage());
        assertTrue(e.getMessage().contains("past the end"), e.getMessage());
        assertTrue(e.getMessage().contains("tensor '"), e.getMessage());
    }

    @Test
    void headerLengthPastEndOfFile() throws IOException {
        Path f = tmp.resolve("h.safetensors");
        ByteBuffer b = ByteBuffer.allocate(16).order(ByteOrder.LITTLE_ENDIAN).putLong(1000).putLong(0);
        Files.write(f, b.array());
        SafetensorsFormatException e = assertThrows(SafetensorsFormatException.class, () -> SafetensorsFile.open(f));
        assertTrue(e.getMessage().contains("header of 1000 bytes runs past the end"), e.getMessage());
        Files.write(f, new byte[] {1, 2, 3});
        e = assertThrows(SafetensorsFormatException.class, () -> SafetensorsFile.open(f));
        assertTrue(e.getMessage().contains("truncated"), e.getMessage());
    }

    @Test
    void corruptHeaderEntries() throws IOException {
        assertHeaderError("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 16,
                "12 bytes of data but shape [2, 2] of F32 needs 16");
        assertHeaderError("{\"w\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2,
                "unsupported dtype Q4");
        assertHeaderError("{\"w\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "malformed header entry");
        assertHeaderError("{not json", 0, "corrupt safetensors header");
        assertHeaderError("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
                "negative dimension");
    }

    private void assertHeaderError(String header, int dataBytes, String expected) throws IOException {
        byte[] h = header.getBytes(StandardCharsets.UTF_8);
        ByteBuffer b = ByteBuffer.allocate(8 + h.length + dataBytes).order(ByteOrder.LITTLE_ENDIAN);
        b.putLong(h.length).put(h);
        Path f = tmp.resolve("bad.safetensors");
        Files.write(f, b.array());
        SafetensorsFormatException e = assertThrows(SafetensorsFormatException.class, () -> SafetensorsFile.open(f));
        assertTrue(e.getMessage().contains(expected), e.getMessage());
    }

    @Test
    void shardedCheckpointResolvesTensorsThroughTheIndex() throws IOException {
        Path dir = Files.createDirectories(tmp.resolve("model"));
        try (NDManager m = NDManager.newBaseManager()) {
            new SafetensorsWriter().add("a", m.ones(new Shape(2))).write(dir.resolve("model-00001-of-00002.safetensors"));
            new SafetensorsWriter().add("b", m.zeros(new Shape(3))).write(dir.resolve("model-00002-of-00002.safetensors"));
            Files.writeString(dir.resolve(HfCheckpoint.INDEX_FILE), "{\"metadata\":{},\"weight_map\":{"
                    + "\"a\":\"model-00001-of-00002.safetensors\",\"b\":\"model-00002-of-00002.safetensors\"}}");
            try (HfCheckpoint c = HfCheckpoint.open(dir)) {
                assertEquals(List.of("a", "b"), List.copyOf(c.names()));
                assertArrayEquals(new float[] {0, 0, 0}, c.load(m, "b").toFloatArray());
                assertEquals(2, c.files().size());
            }
            Files.writeString(dir.resolve(HfCheckpoint.INDEX_FILE), "{\"weight_map\":{"
                    + "\"a\":\"model-00001-of-00002.safetensors\",\"c\":\"model-00002-of-00002.safetensors\"}}");
            SafetensorsFormatException e = assertThrows(SafetensorsFormatException.class, () -> HfCheckpoint.open(dir));
            assertTrue(e.getMessage().contains("tensor 'c'") && e.getMessage().contains("does not contain it"),
                    e.getMessage());
            Files.writeString(dir.resolve(HfCheckpoint.INDEX_FILE), "{\"weight_map\":{\"a\":\"missing.safetensors\"}}");
            e = assertThrows(SafetensorsFormatException.class, () -> HfCheckpoint.open(dir));
            assertTrue(e.getMessage().contains("missing.safetensors"), e.getMessage());
        }
        Path empty = Files.createDirectories(tmp.resolve("empty"));
        SafetensorsFormatException e = assertThrows(SafetensorsFormatException.class, () -> HfCheckpoint.open(empty));
        assertTrue(e.getMessage().contains("no model.safetensors"), e.getMessage());
        assertFalse(Files.exists(empty.resolve("model.safetensors")));
    }
}
