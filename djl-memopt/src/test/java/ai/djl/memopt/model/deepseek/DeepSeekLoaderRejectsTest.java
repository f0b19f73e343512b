package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.quantize.StreamingQuantizedLoader;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Checkpoints that open without a format error but must not become a model. */
class DeepSeekLoaderRejectsTest {

    @TempDir Path tmp;

    /** How one fixture tensor is written: its dtype and little-endian bytes. */
    private interface Rewrite {
        ByteBuffer bytes(String name, float[] values, SafetensorsDType[] dtype);
    }

    private static ByteBuffer f32(float[] v) {
        ByteBuffer b = ByteBuffer.allocate(4 * v.length).order(ByteOrder.LITTLE_ENDIAN);
        for (float f : v) {
            b.putFloat(f);
        }
        return b.flip();
    }

    /** The V3 fixture copied through {@code rewrite} (which may change a tensor's dtype), plus extra 1-float tensors. */
    private Path copy(String name, Rewrite rewrite, int extra) throws IOException {
        Path dir = Files.createDirectories(tmp.resolve(name));
        Files.copy(Fixtures.V3.resolve("config.json"), dir.resolve("config.json"));
        SafetensorsWriter w = new SafetensorsWriter();
        try (SafetensorsFile f = SafetensorsFile.open(Fixtures.V3.resolve("model.safetensors"))) {
            for (String t : f.names()) {
                SafetensorsDType[] dtype = {SafetensorsDType.F32};
                ByteBuffer b = rewrite.bytes(t, f.readFloats(t), dtype);
                if (b != null) {
                    w.add(t, dtype[0], f.info(t).shape(), b);
                }
            }
        }
        for (int i = 0; i < extra; i++) {
            w.add("model.bogus." + i + ".weight", SafetensorsDType.F32, new long[] {1}, f32(new float[] {1}));
        }
        w.write(dir.resolve("model.safetensors"));
        return dir;
    }

    private static String loadError(Path dir) {
        try (NDManager m = NDManager.newBaseManager()) {
            return assertThrows(Exception.class, () -> DeepSeekLoader.load(dir, m, DataType.FLOAT32)).getMessage();
        }
    }

    private static String streamError(Path dir) {
        try (NDManager m = NDManager.newBaseManager()) {
            return assertThrows(Exception.class, () -> StreamingQuantizedLoader.load(dir, m, DataType.FLOAT32,
                    Int8WeightOnlyConfig.builder().build())).getMessage();
        }
    }

    @Test
    void aFloatWeightDeclaredAsIntegersIsRefusedWithExpectedAndFoundDtypes() throws IOException {
        for (String t : new String[] {"model.norm.weight", "model.layers.1.self_attn.o_proj.weight"}) {
            Path dir = copy("i32-" + t, (n, v, dtype) -> {
                if (!n.equals(t)) {
                    return f32(v);
                }
                dtype[0] = SafetensorsDType.I32; // the float bits, declared as integers
                ByteBuffer b = ByteBuffer.allocate(4 * v.length).order(ByteOrder.LITTLE_ENDIAN);
                for (float f : v) {
                    b.putInt(Float.floatToRawIntBits(f));
                }
                return b.flip();
            }, 0);
            for (String m : new String[] {loadError(dir), streamError(dir)}) {
                assertTrue(m.contains("'" + t + "'") && m.contains("I32") && m.contains("floating")
                        && m.contains("F32, F16, BF16 or F64"), m);
            }
        }
    }

    @Test
    void nonFiniteWeightsAreNamedAtLoadTime() throws IOException {
        // o_proj is quantized by the streaming loader (its own reader), norm is kept in float
        for (String t : new String[] {"model.norm.weight", "model.layers.1.self_attn.o_proj.weight"}) {
            Path dir = copy("nan-" + t, (n, v, dtype) -> {
                if (n.equals(t)) {
                    v[3] = Float.NaN;
                    v[5] = Float.POSITIVE_INFINITY;
                }
                return f32(v);
            }, 0);
            for (String m : new String[] {loadError(dir), streamError(dir)}) {
                assertTrue(m.contains("'" + t + "'") && m.contains("1 NaN and 1 infinite")
                        && m.contains("element 3"), m);
            }
        }
    }

    @Test
    void longListsOfNamesAreCappedInMessages() throws IOException {
        String unexpected = loadError(copy("many", (n, v, dtype) -> f32(v), 20_000));
        assertTrue(unexpected.contains("unexpected tensor 'model.bogus.0.weight'")
                && unexpected.contains("and 19990 more"), unexpected);
        assertTrue(unexpected.length() < 2_000, unexpected.length() + " characters: " + unexpected);
        String missing = loadError(copy("few", (n, v, dtype) -> n.equals("model.norm.weight") ? f32(v) : null, 0));
        assertTrue(missing.contains("missing tensor '") && missing.contains(" more"), missing);
        assertTrue(missing.length() < 2_000, missing.length() + " characters: " + missing);
    }

    @Test
    void aQuantizedArtifactIsNotReportedAsUnexpectedTensors() throws IOException {
        Path art = tmp.resolve("art");
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(Fixtures.V3, m, DataType.FLOAT32);
            Quantizer.quantize(lm, Int8WeightOnlyConfig.builder().build());
            QuantizedArtifact.export(lm, art, ExportOptions.builder().optSourceModel(Fixtures.V3).build());
        }
        String whole = loadError(art);
        assertTrue(whole.contains("quantized artifact") && whole.contains("QuantizedArtifact.loadDeepSeek")
                && !whole.contains("unexpected tensor"), whole);
        Files.delete(art.resolve("quantization.json"));
        for (String m : new String[] {loadError(art), streamError(art)}) {
            assertTrue(m.contains("quantization.json is missing") && !m.contains("unexpected tensor"), m);
        }
        assertFalse(Files.exists(art.resolve("quantization.json")));
    }
}
