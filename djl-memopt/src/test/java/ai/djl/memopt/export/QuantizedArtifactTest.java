package ai.djl.memopt.export;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
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
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Activation;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.List;
import java.util.Map;
import java.util.function.Consumer;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class QuantizedArtifactTest {

    private static NDManager manager;

    @TempDir
    Path tmp;

    @BeforeAll
    static void setUp() {
        manager = NDManager.newBaseManager();
    }

    @AfterAll
    static void tearDown() {
        manager.close();
    }

    /** MLP 128 -> 256 -> 256 -> 64 (biases), Gaussian weights from {@code seed}. */
    static SequentialBlock mlp(NDManager m, int seed, long hidden) {
        SequentialBlock b = new SequentialBlock()
                .add(Linear.builder().setUnits(hidden).build())
                .add(Activation.reluBlock())
                .add(Linear.builder().setUnits(256).build())
                .add(Activation.reluBlock())
                .add(Linear.builder().setUnits(64).build());
        b.initialize(m, DataType.FLOAT32, new Shape(1, 128));
        m.getEngine().setRandomSeed(seed);
        for (Map.Entry<String, Parameter> p : BlockTrees.parameters(b).entrySet()) {
            NDArray a = p.getValue().getArray();
            float std = p.getKey().endsWith("bias") ? 0.1f : (float) (1 / Math.sqrt(a.getShape().get(1)));
            a.set(m.randomNormal(0f, std, a.getShape(), DataType.FLOAT32).toFloatArray());
        }
        return b;
    }

    static float[] run(Block b, NDArray x) {
        return b.forward(new ParameterStore(x.getManager(), false), new NDList(x), false).singletonOrThrow()
                .toFloatArray();
    }

    /** A quantized MLP (int4 g32 AWQ on layer 0, int8 on layer 2, int4 g64 RTN on layer 4), exported to dir. */
    private Path exportedMlp(NDManager m, NDArray x, float[][] outputs) throws IOException {
        SequentialBlock b = mlp(m, 31, 256);
        NDArray calib = m.randomNormal(0f, 1f, new Shape(64, 128), DataType.FLOAT32);
        Quantizer.quantize(b, Int4WeightOnlyConfig.builder().optGroupSize(64)
                .addOverride(LayerOverride.use("0", Int4WeightOnlyConfig.builder().optGroupSize(32)
                        .optMethod(QuantMethod.AWQ).build()))
                .addOverride(LayerOverride.use("2", Int8WeightOnlyConfig.builder().build()))
                .optCalibration(Calibration.of(List.of(new NDList(calib))))
                .build());
        Path config = tmp.resolve("src-config.json");
        Files.writeString(config, "{\"model_type\": \"mlp\"}");
        Path dir = tmp.resolve("artifact");
        QuantizedArtifact.export(b, dir, ExportOptions.builder().optConfigJson(config).optSourceFiles(List.of(config))
                .build());
        if (outputs != null) {
            outputs[0] = run(b, x);
        }
        return dir;
    }

    @Test
    void exportThenLoadGivesIdenticalOutputs() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            NDArray x = m.randomNormal(0f, 1f, new Shape(16, 128), DataType.FLOAT32);
            float[][] expected = new float[1][];
            Path dir = exportedMlp(m, x, expected);
            SequentialBlock fresh = mlp(m, 999, 256);
            ArtifactManifest manifest = QuantizedArtifact.load(dir, fresh);
            assertArrayEquals(expected[0], run(fresh, x), "loaded artifact must compute exactly the same");
            assertEquals(3, manifest.layers().size());
            assertEquals(QuantScheme.INT4_WEIGHT_ONLY, manifest.layers().get("0").scheme());
            assertEquals("awq", manifest.layers().get("0").method());
            assertEquals(32, manifest.layers().get("0").groupSize());
            assertEquals(QuantScheme.INT8_WEIGHT_ONLY, manifest.layers().get("2").scheme());
            assertEquals(64, manifest.layers().get("4").groupSize());
            assertInstanceOf(QuantizedLinear.class, BlockTrees.get(fresh, "4"));
            JsonObject meta = json(dir);
            assertEquals(1, meta.get("format_version").getAsInt());
            assertTrue(meta.getAsJsonObject("packing").get("int4").getAsString().contains("2i in the low nibble"));
            assertEquals(QuantizedArtifact.sha256(dir.resolve("model.safetensors")),
                    meta.getAsJsonObject("files").get("model.safetensors").getAsString());
            assertEquals(QuantizedArtifact.sha256(tmp.resolve("src-config.json")),
                    meta.getAsJsonObject("source_files").get("src-config.json").getAsString());
            assertEquals("{\"model_type\": \"mlp\"}", Files.readString(dir.resolve("config.json")));
            try (SafetensorsFile st = SafetensorsFile.open(dir.resolve("model.safetensors"))) {
                assertEquals(new Shape(256, 64), st.info("0.qweight").djlShape());
                assertEquals(new Shape(256, 4), st.info("0.zeros").djlShape());
                assertEquals(new Shape(128), st.info("0.input_scales").djlShape());
                assertEquals(new Shape(256, 1), st.info("2.scales").djlShape());
                assertTrue(st.contains("4.bias"));
            }
            // no temporary files left behind
            try (var files = Files.list(dir)) {
                assertEquals(List.of("config.json", "model.safetensors", "quantization.json"),
                        files.map(p -> p.getFileName().toString()).sorted().collect(java.util.stream.Collectors.toList()));
            }
        }
    }

    @Test
    void largeArtifactsAreShardedAndReloadExactly() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            SequentialBlock b = mlp(m, 51, 256);
            Quantizer.quantize(b, Int8WeightOnlyConfig.builder().build());
            NDArray x = m.randomNormal(0f, 1f, new Shape(4, 128), DataType.FLOAT32);
            float[] expected = run(b, x);
            Path dir = tmp.resolve("sharded");
            // int8 layers: 32 KB, 64 KB and 16 KB of data: three shards of at most 70 KB
            ArtifactManifest man = QuantizedArtifact.export(b, dir, ExportOptions.builder().optMaxShardBytes(70_000)
                    .build());
            assertTrue(man.files().containsKey("model.safetensors.index.json"), man.files().toString());
            assertTrue(man.files().containsKey("model-00001-of-00003.safetensors"), man.files().toString());
            assertTrue(!Files.exists(dir.resolve("model.safetensors")));
            SequentialBlock fresh = mlp(m, 3, 256);
            QuantizedArtifact.load(dir, fresh);
            assertArrayEquals(expected, run(fresh, x));
            // re-exporting unsharded into the same directory removes the shards and the index
            QuantizedArtifact.export(b, dir, ExportOptions.builder().build());
            try (var files = Files.list(dir)) {
                assertEquals(List.of("model.safetensors", "quantization.json"),
                        files.map(p -> p.getFileName().toString()).sorted().collect(java.util.stream.Collectors.toList()));
            }
            QuantizedArtifact.export(b, dir, ExportOptions.builder().optMaxShardBytes(70_000).build());
            Files.delete(dir.resolve("model-00002-of-00003.safetensors"));
            String e = loadError(dir, mlp(m, 4, 256));
            assertTrue(e.contains("missing file model-00002-of-00003.safetensors"), e);
        }
    }

    @Test
    void neverOverwritesASourceCheckpoint() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            Path model = tmp.resolve("hf-model");
            Files.createDirectories(model);
            Files.writeString(model.resolve("model.safetensors"), "original weights");
            SequentialBlock b = mlp(m, 1, 256);
            IOException e = assertThrows(IOException.class,
                    () -> QuantizedArtifact.export(b, model, ExportOptions.builder().build()));
            assertTrue(e.getMessage().contains("refusing to overwrite"), e.getMessage());
            assertEquals("original weights", Files.readString(model.resolve("model.safetensors")));
        }
    }

    @Test
    void prunedTwoFourLayersAreStoredCompactlyAndReloadExactly() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            SequentialBlock b = mlp(m, 41, 256);
            PruningReport pr = Pruner.prune(b, PruningConfig.twoFour());
            NDArray x = m.randomNormal(0f, 1f, new Shape(8, 128), DataType.FLOAT32);
            float[] expected = run(b, x);
            Path dense = tmp.resolve("dense");
            Path sparse = tmp.resolve("sparse");
            QuantizedArtifact.export(b, dense, ExportOptions.builder().build());
            List<String> paths = pr.layers().stream().map(PruningReport.Layer::path)
                    .collect(java.util.stream.Collectors.toList());
            ArtifactManifest man = QuantizedArtifact.export(b, sparse,
                    ExportOptions.builder().optSparse24Layers(paths).build());
            assertEquals(3, man.sparse24().size());
            long denseBytes = Files.size(dense.resolve("model.safetensors"));
            long sparseBytes = Files.size(sparse.resolve("model.safetensors"));
            // weights 114688 floats -> half the values + 1/8 byte per weight
            assertTrue(sparseBytes < denseBytes * 0.6, sparseBytes + " vs " + denseBytes);
            SequentialBlock fresh = mlp(m, 5, 256);
            QuantizedArtifact.load(sparse, fresh);
            assertArrayEquals(expected, run(fresh, x));
            // a dense layer cannot be exported as 2:4
            SequentialBlock denseBlock = mlp(m, 6, 256);
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> QuantizedArtifact.export(denseBlock, tmp.resolve("bad"),
                            ExportOptions.builder().optSparse24Layers(List.of("2")).build()));
            assertTrue(e.getMessage().contains("layer '2'") && e.getMessage().contains("not 2:4"), e.getMessage());
        }
    }

    private static JsonObject json(Path dir) throws IOException {
        return JsonParser.parseString(Files.readString(dir.resolve("quantization.json"))).getAsJsonObject();
    }

    private static void editJson(Path dir, Consumer<JsonObject> edit) throws IOException {
        JsonObject o = json(dir);
        edit.accept(o);
        Files.writeString(dir.resolve("quantization.json"), o.toString(), StandardCharsets.UTF_8);
    }

    /** Rewrites model.safetensors keeping only tensors accepted by the filter and records its new sha256. */
    private static void rewriteWeights(Path dir, java.util.function.Predicate<String> keep) throws IOException {
        Path f = dir.resolve("model.safetensors");
        SafetensorsWriter w = new SafetensorsWriter();
        try (SafetensorsFile st = SafetensorsFile.open(f)) {
            for (String n : st.names()) {
                if (keep.test(n)) {
                    TensorInfo i = st.info(n);
                    ByteBuffer copy = ByteBuffer.allocate((int) i.byteLength());
                    copy.put(st.bytes(n)).flip();
                    w.add(n, i.dtype(), i.shape(), copy);
                }
            }
        }
        w.write(f);
        String sha = QuantizedArtifact.sha256(f);
        editJson(dir, o -> o.getAsJsonObject("files").addProperty("model.safetensors", sha));
    }

    private String loadError(Path dir, Block block) {
        return assertThrows(IOException.class, () -> QuantizedArtifact.load(dir, block)).getMessage();
    }

    @Test
    void everyCorruptionIsReportedByName() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            NDArray x = m.randomNormal(0f, 1f, new Shape(4, 128), DataType.FLOAT32);
            Path dir = exportedMlp(m, x, null);
            Path pristine = tmp.resolve("pristine");
            copyDir(dir, pristine);

            // missing metadata
            Files.delete(dir.resolve("quantization.json"));
            assertTrue(loadError(dir, mlp(m, 1, 256)).contains("missing quantization.json"));
            restore(pristine, dir);

            // missing weights file
            Files.delete(dir.resolve("model.safetensors"));
            assertTrue(loadError(dir, mlp(m, 1, 256)).contains("missing file model.safetensors"));
            restore(pristine, dir);

            // a flipped byte in the weights
            try (FileChannel ch = FileChannel.open(dir.resolve("model.safetensors"), StandardOpenOption.WRITE,
                    StandardOpenOption.READ)) {
                ByteBuffer one = ByteBuffer.allocate(1);
                ch.read(one, ch.size() - 3);
                one.put(0, (byte) (one.get(0) ^ 0x5A)).rewind();
                ch.write(one, ch.size() - 3);
            }
            String sha = loadError(dir, mlp(m, 1, 256));
            assertTrue(sha.contains("model.safetensors: sha256 mismatch"), sha);
            restore(pristine, dir);

            // config.json replaced
            Files.writeString(dir.resolve("config.json"), "{}");
            assertTrue(loadError(dir, mlp(m, 1, 256)).contains("config.json: sha256 mismatch"));
            restore(pristine, dir);

            // truncated weights (checksum updated, so the reader must catch it)
            Path f = dir.resolve("model.safetensors");
            try (FileChannel ch = FileChannel.open(f, StandardOpenOption.WRITE)) {
                ch.truncate(ch.size() - 100);
            }
            String newSha = QuantizedArtifact.sha256(f);
            editJson(dir, o -> o.getAsJsonObject("files").addProperty("model.safetensors", newSha));
            String trunc = loadError(dir, mlp(m, 1, 256));
            assertTrue(trunc.contains("model.safetensors"), trunc);
            restore(pristine, dir);

            // a tensor missing; the block is left untouched
            rewriteWeights(dir, n -> !n.equals("4.scales"));
            SequentialBlock untouched = mlp(m, 1, 256);
            String missing = loadError(dir, untouched);
            assertTrue(missing.contains("tensor '4.scales' is missing"), missing);
            assertInstanceOf(Linear.class, BlockTrees.get(untouched, "0"), "nothing replaced when loading fails");
            restore(pristine, dir);

            // wrong shape: a block of another architecture (hidden 128 instead of 256)
            String shape = loadError(dir, mlp(m, 1, 128));
            assertTrue(shape.contains("layer '0': artifact weight shape (256, 128) but the block's Linear has (128, 128)"),
                    shape);

            // unknown scheme
            editJson(dir, o -> o.getAsJsonObject("layers").getAsJsonObject("4").addProperty("scheme", "int3"));
            String scheme = loadError(dir, mlp(m, 1, 256));
            assertTrue(scheme.contains("layer '4'") && scheme.contains("unknown quantization scheme 'int3'"), scheme);
            restore(pristine, dir);

            // truncated metadata
            Files.writeString(dir.resolve("quantization.json"),
                    Files.readString(pristine.resolve("quantization.json")).substring(0, 200));
            String bad = loadError(dir, mlp(m, 1, 256));
            assertTrue(bad.contains("quantization.json: invalid JSON"), bad);
            restore(pristine, dir);

            // another format
            editJson(dir, o -> o.addProperty("format", "gguf"));
            assertTrue(loadError(dir, mlp(m, 1, 256)).contains("format is 'gguf', expected 'djl-memopt-quantized'"));
            restore(pristine, dir);

            // wrong format version
            editJson(dir, o -> o.addProperty("format_version", 3));
            assertTrue(loadError(dir, mlp(m, 1, 256)).contains("unsupported format_version 3"));
            restore(pristine, dir);

            // a missing field
            editJson(dir, o -> o.getAsJsonObject("layers").getAsJsonObject("2").remove("group_size"));
            assertTrue(loadError(dir, mlp(m, 1, 256)).contains("layer '2': missing field 'group_size'"));
            restore(pristine, dir);

            // quantized tensor with the wrong type (scales stored as F16)
            rewriteWeights(dir, n -> true);
            Path wf = dir.resolve("model.safetensors");
            SafetensorsWriter w = new SafetensorsWriter();
            try (SafetensorsFile st = SafetensorsFile.open(wf); NDManager s = m.newSubManager()) {
                for (String n : st.names()) {
                    NDArray a = st.load(s, n);
                    w.add(n, n.equals("2.scales") ? a.toType(DataType.FLOAT16, false) : a);
                }
                w.write(tmp.resolve("tmp.safetensors"));
            }
            Files.move(tmp.resolve("tmp.safetensors"), wf, java.nio.file.StandardCopyOption.REPLACE_EXISTING);
            String wsha = QuantizedArtifact.sha256(wf);
            editJson(dir, o -> o.getAsJsonObject("files").addProperty("model.safetensors", wsha));
            String type = loadError(dir, mlp(m, 1, 256));
            assertTrue(type.contains("tensor '2.scales': expected F32 (256, 1), got F16 (256, 1)"), type);
            restore(pristine, dir);

            // still loads after all the restores
            QuantizedArtifact.load(dir, mlp(m, 1, 256));
        }
    }

    @Test
    void unexpectedTensorsAreRejected() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            Path dir = exportedMlp(m, null, null);
            // a block with one more layer: its parameters are missing from the artifact
            SequentialBlock bigger = mlp(m, 2, 256);
            bigger.add(Linear.builder().setUnits(8).build());
            bigger.initialize(m, DataType.FLOAT32, new Shape(1, 128));
            String missing = loadError(dir, bigger);
            assertTrue(missing.contains("tensor '5.weight' is missing"), missing);
            // a block with fewer layers
            SequentialBlock smaller = new SequentialBlock().add(Linear.builder().setUnits(256).build());
            smaller.initialize(m, DataType.FLOAT32, new Shape(1, 128));
            String fewer = loadError(dir, smaller);
            assertTrue(fewer.contains("quantized layer '2' is not in the block"), fewer);
            // a tensor in the file that nothing in the block or the metadata accounts for
            Path f = dir.resolve("model.safetensors");
            SafetensorsWriter w = new SafetensorsWriter();
            try (SafetensorsFile st = SafetensorsFile.open(f); NDManager s = m.newSubManager()) {
                for (String n : st.names()) {
                    w.add(n, st.load(s, n));
                }
                w.add("5.weight", s.zeros(new Shape(8, 64)));
                w.write(tmp.resolve("extra.safetensors"));
            }
            Files.move(tmp.resolve("extra.safetensors"), f, java.nio.file.StandardCopyOption.REPLACE_EXISTING);
            String sha = QuantizedArtifact.sha256(f);
            editJson(dir, o -> o.getAsJsonObject("files").addProperty("model.safetensors", sha));
            String extra = loadError(dir, mlp(m, 3, 256));
            assertTrue(extra.contains("tensors the block has no place for: [5.weight]"), extra);
        }
    }

    private static void copyDir(Path from, Path to) throws IOException {
        Files.createDirectories(to);
        try (var files = Files.list(from)) {
            for (Path p : (Iterable<Path>) files::iterator) {
                Files.copy(p, to.resolve(p.getFileName()), java.nio.file.StandardCopyOption.REPLACE_EXISTING);
            }
        }
    }

    private static void restore(Path pristine, Path dir) throws IOException {
        try (var files = Files.list(dir)) {
            for (Path p : (Iterable<Path>) files::iterator) {
                Files.delete(p);
            }
        }
        copyDir(pristine, dir);
    }
}
