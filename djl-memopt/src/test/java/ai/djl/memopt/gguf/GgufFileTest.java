package ai.djl.memopt.gguf;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.safetensors.Halfs;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** The GGUF reader and writer: round trips, hand-computed ggml blocks, and named errors for bad files. */
class GgufFileTest {

    @TempDir
    Path tmp;

    /** A file with metadata of several types and an F32 and a Q8_0 tensor. */
    private Path small() throws IOException {
        float[] v = new float[64];
        for (int i = 0; i < v.length; i++) {
            v[i] = (i - 32) / 8f;
        }
        GgufWriter w = new GgufWriter()
                .put("general.architecture", GgufValue.string("deepseek2"))
                .put("a.u32", GgufValue.uint32(4_000_000_000L))
                .put("a.f32", GgufValue.float32(1e-6))
                .put("a.bool", GgufValue.bool(true))
                .put("a.strings", GgufValue.array(GgufValueType.STRING, List.of("x", "ü", "")))
                .put("a.ints", GgufValue.array(GgufValueType.INT32, List.of(-1L, 2L)));
        w.addTensor("norm.weight", GgmlType.F32, new long[] {5}, os -> os.write(GgmlQuants.quantize(GgmlType.F32,
                new float[] {1, 2, 3, 4, 5})));
        w.addTensor("proj.weight", GgmlType.Q8_0, new long[] {32, 2}, os -> os.write(GgmlQuants.quantize(GgmlType.Q8_0,
                v)));
        Path file = tmp.resolve("small.gguf");
        w.write(file);
        return file;
    }

    @Test
    void writesAndReadsBack() throws Exception {
        Path file = small();
        assertTrue(GgufFile.isGguf(file));
        assertFalse(GgufFile.isGguf(tmp));
        try (GgufFile f = GgufFile.open(file)) {
            assertEquals(3, f.version());
            assertEquals("deepseek2", f.string("general.architecture").orElseThrow());
            assertEquals(4_000_000_000L, f.get("a.u32").orElseThrow().asLong());
            assertEquals(GgufValueType.UINT32, f.get("a.u32").orElseThrow().type());
            assertEquals(1e-6f, (float) f.get("a.f32").orElseThrow().asDouble());
            assertTrue(f.get("a.bool").orElseThrow().asBool());
            assertEquals(List.of("x", "ü", ""), f.get("a.strings").orElseThrow().asList());
            assertEquals(List.of(-1L, 2L), f.get("a.ints").orElseThrow().asList());
            GgufTensorInfo norm = f.tensor("norm.weight");
            assertArrayEquals(new float[] {1, 2, 3, 4, 5}, f.readFloats(norm, 0, 5));
            GgufTensorInfo proj = f.tensor("proj.weight");
            assertArrayEquals(new long[] {2, 32}, proj.shape());
            assertEquals(0, proj.fileOffset() % GgufFile.DEFAULT_ALIGNMENT);
            assertEquals(2 * 34, proj.byteLength());
            float[] back = f.readFloats(proj, 32, 32); // the second row alone
            assertEquals(0f, back[0], 1e-2f);
            assertEquals(31 / 8f, back[31], 0.02f);
        }
    }

    @Test
    void q8AndQ4BlocksAsGgmlDefinesThem() {
        float[] x = new float[32];
        for (int j = 0; j < 32; j++) {
            x[j] = j - 16; // amax 16 at j = 0, negative
        }
        ByteBuffer q8 = ByteBuffer.wrap(GgmlQuants.quantize(GgmlType.Q8_0, x)).order(ByteOrder.LITTLE_ENDIAN);
        assertEquals(34, q8.capacity());
        assertEquals(Halfs.floatToF16(16f / 127), q8.getShort(0)); // d = amax / 127
        assertEquals(-127, q8.get(2)); // -16 * 127/16
        assertEquals(8, q8.get(2 + 17)); // 1 * 7.9375 = 7.9375 -> 8
        assertEquals(16, q8.get(2 + 18)); // 15.875 -> 16
        assertEquals(0, q8.get(2 + 16));
        ByteBuffer q4 = ByteBuffer.wrap(GgmlQuants.quantize(GgmlType.Q4_0, x)).order(ByteOrder.LITTLE_ENDIAN);
        assertEquals(18, q4.capacity());
        assertEquals(Halfs.floatToF16(2f), q4.getShort(0)); // d = max / -8 = -16 / -8
        // byte j: value j (low nibble) and value j + 16 (high): q = trunc(x / 2 + 8.5), capped at 15
        assertEquals(0 | (8 << 4), q4.get(2) & 0xff); // x0 = -16 -> 0; x16 = 0 -> 8
        assertEquals(4 | (12 << 4), q4.get(2 + 7) & 0xff); // x7 = -9 -> trunc(4) = 4; x23 = 7 -> trunc(12) = 12
        assertEquals(8 | (15 << 4), q4.get(2 + 15) & 0xff); // x15 = -1 -> -0.5 + 8.5 = 8; x31 = 15 -> 16, capped 15
    }

    @Test
    void roundfHalvesAwayFromZero() {
        assertEquals(3, GgmlQuants.roundf(2.5f));
        assertEquals(-3, GgmlQuants.roundf(-2.5f));
        assertEquals(-2, GgmlQuants.roundf(-2.4f));
    }

    @Test
    void truncatedFilesAreNamed() throws Exception {
        Path good = small();
        byte[] all = Files.readAllBytes(good);
        int dataEnd;
        try (GgufFile f = GgufFile.open(good)) {
            GgufTensorInfo last = f.tensor("proj.weight");
            dataEnd = (int) (last.fileOffset() + last.byteLength()); // alignment padding may follow
        }
        for (int cut : new int[] {0, 10, 30, 100, dataEnd - 40, dataEnd - 1}) {
            Path bad = tmp.resolve("cut" + cut + ".gguf");
            Files.write(bad, Arrays.copyOf(all, cut));
            GgufFormatException e = assertThrows(GgufFormatException.class, () -> GgufFile.open(bad).close());
            assertTrue(e.getMessage().contains("truncated") && e.getMessage().contains(bad.toString()),
                    cut + ": " + e.getMessage());
        }
    }

    @Test
    void wrongMagicAndVersionAreNamed() throws Exception {
        byte[] all = Files.readAllBytes(small());
        byte[] magic = all.clone();
        magic[0] = 'X';
        assertThrows(GgufFormatException.class, () -> open(magic), "not a GGUF file");
        byte[] version = all.clone();
        version[4] = 7;
        assertTrue(message(version).contains("GGUF version 7 is not supported"));
    }

    @Test
    void unknownAndUnsupportedTensorTypesAreNamed() throws Exception {
        byte[] all = Files.readAllBytes(small());
        int typeAt = tensorInfo(all, "proj.weight") + 4 + 16;
        byte[] unknown = all.clone();
        ByteBuffer.wrap(unknown).order(ByteOrder.LITTLE_ENDIAN).putInt(typeAt, 99);
        String m = message(unknown);
        assertTrue(m.contains("tensor 'proj.weight' has type unknown (99)"), m);
        byte[] q5k = all.clone();
        ByteBuffer.wrap(q5k).order(ByteOrder.LITTLE_ENDIAN).putInt(typeAt, 13);
        assertTrue(message(q5k).contains("Q5_K"), message(q5k));
    }

    @Test
    void misalignedDataIsNamed() throws Exception {
        byte[] all = Files.readAllBytes(small());
        int offsetAt = tensorInfo(all, "proj.weight") + 4 + 16 + 4;
        ByteBuffer b = ByteBuffer.wrap(all).order(ByteOrder.LITTLE_ENDIAN);
        b.putLong(offsetAt, b.getLong(offsetAt) + 2);
        String m = message(all);
        assertTrue(m.contains("'proj.weight'") && m.contains("not aligned"), m);
    }

    @Test
    void aMissingTensorIsNamed() throws Exception {
        Path v3 = GgufDeepSeekTest.V3;
        Path good = tmp.resolve("good.gguf");
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(v3, m, DataType.FLOAT32);
            GgufExporter.export(lm, v3, GgmlType.F32, good, null);
        }
        // rename a tensor in place (same length): the file stays valid GGUF, the model misses one tensor
        byte[] all = Files.readAllBytes(good);
        int at = nameAt(all, "blk.1.ffn_norm.weight");
        byte[] renamed = "blk.1.ffn_nrrm.weight".getBytes(StandardCharsets.UTF_8);
        System.arraycopy(renamed, 0, all, at, renamed.length);
        Path bad = tmp.resolve("missing.gguf");
        Files.write(bad, all);
        try (NDManager m = NDManager.newBaseManager()) {
            GgufFormatException e = assertThrows(GgufFormatException.class,
                    () -> GgufLoader.load(bad, m, DataType.FLOAT32, true));
            assertTrue(e.getMessage().contains("missing tensor 'blk.1.ffn_norm.weight'"), e.getMessage());
            assertTrue(e.getMessage().contains(bad.toString()), e.getMessage());
        }
    }

    @Test
    void anotherArchitectureIsNamed() throws Exception {
        Path file = tmp.resolve("llama.gguf");
        new GgufWriter().put("general.architecture", GgufValue.string("llama")).write(file);
        try (NDManager m = NDManager.newBaseManager()) {
            GgufFormatException e = assertThrows(GgufFormatException.class,
                    () -> GgufLoader.load(file, m, DataType.FLOAT32, true));
            assertTrue(e.getMessage().contains("architecture 'llama' is not supported"), e.getMessage());
        }
    }

    /** Where a tensor's name starts in the tensor table (its last occurrence in the file). */
    private static int nameAt(byte[] file, String name) {
        byte[] n = name.getBytes(StandardCharsets.UTF_8);
        for (int i = file.length - n.length; i >= 8; i--) {
            if (Arrays.equals(Arrays.copyOfRange(file, i, i + n.length), n)) {
                return i;
            }
        }
        throw new AssertionError(name + " not found");
    }

    /** Where a tensor's entry continues after its name: n_dims (4 bytes), ne (8 each), type (4), offset (8). */
    private static int tensorInfo(byte[] file, String name) {
        return nameAt(file, name) + name.length();
    }

    private void open(byte[] bytes) throws IOException {
        Path p = Files.write(tmp.resolve("bad.gguf"), bytes);
        GgufFile.open(p).close();
    }

    private String message(byte[] bytes) {
        return assertThrows(GgufFormatException.class, () -> open(bytes)).getMessage();
    }
}
