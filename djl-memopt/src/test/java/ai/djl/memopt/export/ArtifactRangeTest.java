package ai.djl.memopt.export;

import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.Calibration;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.LayerOverride;
import ai.djl.memopt.quantize.PruningConfig;
import ai.djl.memopt.quantize.PruningReport;
import ai.djl.memopt.quantize.Pruner;
import ai.djl.memopt.quantize.QuantMethod;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.function.Consumer;
import java.util.stream.Collectors;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Artifacts whose checksums were recomputed after their values were changed to ones the writer never produces: the
 * checksums pass, so the loader must check the values themselves, and name the tensor.
 */
class ArtifactRangeTest {

    private static NDManager manager;

    @TempDir Path tmp;

    @BeforeAll
    static void setUp() {
        manager = NDManager.newBaseManager();
    }

    @AfterAll
    static void tearDown() {
        manager.close();
    }

    /** Layer 0 int4 g32 AWQ, layer 2 int8, layer 4 int4 g64; or, {@code twoFour}, every layer 2:4 in float. */
    private Path artifact(String name, boolean twoFour) throws IOException {
        try (NDManager m = manager.newSubManager()) {
            SequentialBlock b = QuantizedArtifactTest.mlp(m, 7, 256);
            ExportOptions.Builder options = ExportOptions.builder();
            if (twoFour) {
                PruningReport r = Pruner.prune(b, PruningConfig.twoFour());
                options.optSparse24Layers(r.layers().stream().map(PruningReport.Layer::path).collect(Collectors.toList()));
            } else {
                Quantizer.quantize(b, Int4WeightOnlyConfig.builder().optGroupSize(64)
                        .addOverride(LayerOverride.use("0", Int4WeightOnlyConfig.builder().optGroupSize(32)
                                .optMethod(QuantMethod.AWQ).build()))
                        .addOverride(LayerOverride.use("2", Int8WeightOnlyConfig.builder().build()))
                        .optCalibration(Calibration.of(List.of(new NDList(
                                m.randomNormal(0f, 1f, new Shape(32, 128), DataType.FLOAT32)))))
                        .build());
            }
            Path dir = tmp.resolve(name);
            QuantizedArtifact.export(b, dir, options.build());
            return dir;
        }
    }

    /** Changes one tensor's bytes in place and records the file's new sha256, as a careful tamperer would. */
    private static void tamper(Path dir, String tensor, Consumer<ByteBuffer> edit) throws IOException {
        Path f = dir.resolve("model.safetensors");
        SafetensorsWriter w = new SafetensorsWriter().putMetadata("format", "pt");
        try (SafetensorsFile st = SafetensorsFile.open(f)) {
            for (String n : st.names()) {
                TensorInfo i = st.info(n);
                ByteBuffer copy = ByteBuffer.allocate((int) i.byteLength()).order(ByteOrder.LITTLE_ENDIAN);
                copy.put(st.bytes(n)).flip();
                if (n.equals(tensor)) {
                    edit.accept(copy);
                }
                w.add(n, i.dtype(), i.shape(), copy);
            }
        }
        w.write(f);
        Path meta = dir.resolve("quantization.json");
        JsonObject o = JsonParser.parseString(Files.readString(meta)).getAsJsonObject();
        o.getAsJsonObject("files").addProperty("model.safetensors", QuantizedArtifact.sha256(f));
        Files.writeString(meta, o.toString(), StandardCharsets.UTF_8);
    }

    /** Loading fails naming the tensor and what is wrong, and leaves the block as it was. */
    private static void assertRefused(Path dir, String tensor, String... words) {
        SequentialBlock block = QuantizedArtifactTest.mlp(manager, 1, 256);
        String m = assertThrows(IOException.class, () -> QuantizedArtifact.load(dir, block)).getMessage();
        assertTrue(m.contains("tensor '" + tensor + "'"), m);
        for (String w : words) {
            assertTrue(m.contains(w), "'" + w + "' not in: " + m);
        }
        for (String layer : new String[] {"0", "2", "4"}) {
            assertInstanceOf(Linear.class, BlockTrees.get(block, layer), "the block is untouched");
        }
    }

    @Test
    void outOfRangeQuantizedValuesAreRefusedByName() throws IOException {
        Path pristine = artifact("pristine", false);
        QuantizedArtifact.load(pristine, QuantizedArtifactTest.mlp(manager, 1, 256)); // the control loads
        Object[][] cases = {
            {"4.zeros", (Consumer<ByteBuffer>) b -> b.put(5, (byte) 255), new String[] {"255", "0..15"}},
            {"0.zeros", (Consumer<ByteBuffer>) b -> b.put(0, (byte) 16), new String[] {"16", "0..15"}},
            {"4.scales", (Consumer<ByteBuffer>) b -> b.putFloat(8, Float.NaN), new String[] {"NaN", "positive"}},
            {"4.scales", (Consumer<ByteBuffer>) b -> b.putFloat(4, -0.25f), new String[] {"-0.25", "positive"}},
            {"2.scales", (Consumer<ByteBuffer>) b -> b.putFloat(0, 0f), new String[] {"0.0", "positive"}},
            {"0.input_scales", (Consumer<ByteBuffer>) b -> b.putFloat(12, Float.POSITIVE_INFINITY),
                    new String[] {"Infinity", "positive"}},
            {"2.qweight", (Consumer<ByteBuffer>) b -> b.put(3, (byte) -128), new String[] {"-128", "-127..127"}},
            {"4.bias", (Consumer<ByteBuffer>) b -> b.putFloat(0, Float.NaN), new String[] {"NaN"}},
        };
        int i = 0;
        for (Object[] c : cases) {
            Path dir = artifact("bad" + i++, false);
            @SuppressWarnings("unchecked")
            Consumer<ByteBuffer> edit = (Consumer<ByteBuffer>) c[1];
            tamper(dir, (String) c[0], edit);
            assertRefused(dir, (String) c[0], (String[]) c[2]);
        }
    }

    @Test
    void invalidTwoFourPositionsAreRefusedByName() throws IOException {
        Path dir = artifact("sparse", true);
        QuantizedArtifact.load(dir, QuantizedArtifactTest.mlp(manager, 1, 256));
        // code 0x5 = positions (1, 1): both kept values would land in one column
        tamper(dir, "2.sparse24_indices", b -> b.put(1, (byte) 0x95));
        assertRefused(dir, "2.sparse24_indices", "p0 < p1");
    }
}
