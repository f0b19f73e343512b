package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.Halfs;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.memopt.testing.LoadedArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import ai.djl.training.ParameterStore;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.Map;
import java.util.function.BiFunction;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class DeepSeekLoaderTest {

    @TempDir Path tmp;

    /** What to write for one fixture tensor: its floats and shape, possibly changed, or null to drop it. */
    private interface Edit extends BiFunction<String, float[], float[]> {}

    private static ByteBuffer f32(float[] v) {
        ByteBuffer b = ByteBuffer.allocate(v.length * 4).order(ByteOrder.LITTLE_ENDIAN);
        for (float f : v) {
            b.putFloat(f);
        }
        return b.flip();
    }

    private static ByteBuffer bf16(float[] v) {
        ByteBuffer b = ByteBuffer.allocate(v.length * 2).order(ByteOrder.LITTLE_ENDIAN);
        for (float f : v) {
            b.putShort(Halfs.floatToBf16(f));
        }
        return b.flip();
    }

    /** Copies the V3 fixture into a new directory, tensor by tensor, through {@code edit}. */
    private Path copyFixture(String name, boolean asBf16, Edit edit, String... extra) throws IOException {
        Path dir = tmp.resolve(name);
        Files.createDirectories(dir);
        Files.copy(Fixtures.V3.resolve("config.json"), dir.resolve("config.json"));
        SafetensorsWriter w = new SafetensorsWriter();
        try (SafetensorsFile f = SafetensorsFile.open(Fixtures.V3.resolve("model.safetensors"))) {
            for (String t : f.names()) {
                float[] v = edit.apply(t, f.readFloats(t));
                if (v == null) {
                    continue;
                }
                long[] shape = f.info(t).shape();
                if (v.length != f.info(t).numel()) {
                    shape = new long[] {v.length};
                }
                w.add(t, asBf16 ? SafetensorsDType.BF16 : SafetensorsDType.F32, shape, asBf16 ? bf16(v) : f32(v));
            }
        }
        for (String t : extra) {
            w.add(t, SafetensorsDType.F32, new long[] {2}, f32(new float[] {1, 2}));
        }
        w.write(dir.resolve("model.safetensors"));
        return dir;
    }

    @Test
    void bf16CheckpointLoadsToTheRoundedValues() throws Exception {
        Path dir = copyFixture("bf16", true, (n, v) -> v);
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile f = SafetensorsFile.open(Fixtures.V3.resolve("model.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, m, DataType.FLOAT32);
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(lm).entrySet()) {
                float[] original = f.readFloats(e.getKey());
                float[] expected = new float[original.length];
                for (int i = 0; i < original.length; i++) {
                    expected[i] = Halfs.bf16ToFloat(Halfs.floatToBf16(original[i]));
                }
                NDArray a = e.getValue().getArray();
                assertEquals(DataType.FLOAT32, a.getDataType());
                assertArrayEquals(expected, a.toFloatArray(), 0f, e.getKey());
            }
        }
    }

    @Test
    void bf16ModelTypeIsRejectedClearly() {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> DeepSeekLoader.load(Fixtures.V3, Device.cpu(), DataType.BFLOAT16));
        assertTrue(e.getMessage().contains("BF16"), e.getMessage());
    }

    @Test
    void wrongShapeNamesFileTensorAndShapes() throws Exception {
        String t = "model.layers.1.self_attn.o_proj.weight";
        Path dir = copyFixture("shape", false, (n, v) -> n.equals(t) ? Arrays.copyOf(v, 100) : v);
        try (NDManager m = NDManager.newBaseManager()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> DeepSeekLoader.load(dir, m, DataType.FLOAT32));
            assertTrue(e.getMessage().contains(t) && e.getMessage().contains("model.safetensors")
                    && e.getMessage().contains("(100)") && e.getMessage().contains("(64, 64)"), e.getMessage());
        }
    }

    @Test
    void missingTensorIsNamed() throws Exception {
        Path dir = copyFixture("missing", false, (n, v) -> n.equals("model.norm.weight") ? null : v);
        try (NDManager m = NDManager.newBaseManager()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> DeepSeekLoader.load(dir, m, DataType.FLOAT32));
            assertTrue(e.getMessage().contains("missing tensor 'model.norm.weight'"), e.getMessage());
        }
    }

    @Test
    void unexpectedTensorIsNamedButMtpLayersAreSkipped() throws Exception {
        Path bad = copyFixture("unexpected", false, (n, v) -> v, "model.layers.1.mlp.bogus.weight");
        try (NDManager m = NDManager.newBaseManager()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> DeepSeekLoader.load(bad, m, DataType.FLOAT32));
            assertTrue(e.getMessage().contains("unexpected tensor 'model.layers.1.mlp.bogus.weight'")
                    && e.getMessage().contains("model.safetensors"), e.getMessage());
        }
        Path mtp = copyFixture("mtp", false, (n, v) -> v, "model.layers.3.eh_proj.weight",
                "model.layers.3.enorm.weight");
        try (DeepSeekForCausalLM loaded = DeepSeekLoader.load(mtp, Device.cpu(), DataType.FLOAT32)) {
            assertEquals(3, loaded.model().layers().size());
        }
    }

    @Test
    void corruptFilesFailWithTheFileName() throws Exception {
        Path dir = copyFixture("truncated", false, (n, v) -> v);
        Path file = dir.resolve("model.safetensors");
        byte[] bytes = Files.readAllBytes(file);
        Files.write(file, Arrays.copyOf(bytes, bytes.length - 1000));
        try (NDManager m = NDManager.newBaseManager()) {
            IOException e = assertThrows(IOException.class, () -> DeepSeekLoader.load(dir, m, DataType.FLOAT32));
            assertTrue(e.getMessage().contains(file.toString()), e.getMessage());

            // a header whose offsets point past the end of the file
            String header = "{\"model.norm.weight\":{\"dtype\":\"F32\",\"shape\":[64],\"data_offsets\":[0,4096]}}";
            byte[] h = header.getBytes(StandardCharsets.UTF_8);
            ByteBuffer b = ByteBuffer.allocate(8 + h.length + 256).order(ByteOrder.LITTLE_ENDIAN);
            b.putLong(h.length).put(h);
            Files.write(file, b.array());
            IOException e2 = assertThrows(IOException.class, () -> DeepSeekLoader.load(dir, m, DataType.FLOAT32));
            assertTrue(e2.getMessage().contains(file.toString()), e2.getMessage());

            IOException e3 = assertThrows(IOException.class,
                    () -> DeepSeekLoader.load(tmp.resolve("nope"), m, DataType.FLOAT32));
            assertTrue(e3.getMessage().contains("nope"), e3.getMessage());
        }
    }

    @Test
    void savedModelLoadsBackEqualAndAtomically() throws Exception {
        Path out = tmp.resolve("saved");
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(Fixtures.V3, m, DataType.FLOAT32);
            DeepSeekCheckpointWriter.save(lm, lm.config(), out);
            try (Stream<Path> files = Files.list(out)) {
                assertEquals(2, files.filter(p -> !p.getFileName().toString().startsWith(".")).count());
            }
            try (Stream<Path> files = Files.list(out)) {
                assertFalse(files.anyMatch(p -> p.getFileName().toString().endsWith(".tmp")));
            }
            DeepSeekForCausalLM back = DeepSeekLoader.load(out, m, DataType.FLOAT32);
            assertEquals(lm.config(), back.config());
            Map<String, Parameter> a = BlockTrees.parameters(lm);
            Map<String, Parameter> b = BlockTrees.parameters(back);
            assertEquals(a.keySet(), b.keySet());
            for (String k : a.keySet()) {
                assertArrayEquals(a.get(k).getArray().toFloatArray(), b.get(k).getArray().toFloatArray(), 0f, k);
            }
            // the names are Hugging Face's: exactly the fixture's tensors
            try (SafetensorsFile saved = SafetensorsFile.open(out.resolve("model.safetensors"));
                    SafetensorsFile orig = SafetensorsFile.open(Fixtures.V3.resolve("model.safetensors"))) {
                assertEquals(orig.names(), saved.names());
                for (String n : orig.names()) {
                    TensorInfo i = orig.info(n);
                    assertArrayEquals(i.shape(), saved.info(n).shape(), n);
                }
            }
        }
    }

    @Test
    void fp16LoadStaysCloseToTransformers() throws Exception {
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(Fixtures.V3, Device.cpu(), DataType.FLOAT16);
                SafetensorsFile ref = SafetensorsFile.open(Fixtures.V3.resolve("reference.safetensors"));
                NDManager m = lm.manager().newSubManager()) {
            assertEquals(DataType.FLOAT16, lm.dataType());
            NDArray ids = ref.load(m, "input_ids");
            NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(ids), false).head();
            assertEquals(DataType.FLOAT32, logits.getDataType());
            float d = Fixtures.maxAbsDiff(logits, ref.load(m, "logits"));
            System.out.printf("V3 fp16 logits max abs diff %.3g%n", d);
            assertTrue(d < 5e-2, "fp16 logits differ by " + d);
        }
    }

    @Test
    void randomInitIsDeterministicPerSeed() {
        DeepSeekConfig c = DeepSeekConfig.fromJsonString(DeepSeekConfig.preset("bench-tiny").toBuilder()
                .vocabSize(256).hiddenSize(32).intermediateSize(64).moeIntermediateSize(16).numHiddenLayers(2)
                .qLoraRank(16).kvLoraRank(16).qkNopeHeadDim(8).qkRopeHeadDim(4).vHeadDim(8)
                .build().toJson());
        try (NDManager m = NDManager.newBaseManager()) {
            Map<String, Parameter> a = BlockTrees.parameters(DeepSeekForCausalLM.random(c, 7, m, DataType.FLOAT32));
            Map<String, Parameter> b = BlockTrees.parameters(DeepSeekForCausalLM.random(c, 7, m, DataType.FLOAT32));
            Map<String, Parameter> other = BlockTrees.parameters(DeepSeekForCausalLM.random(c, 8, m, DataType.FLOAT32));
            String w = "model.layers.1.mlp.experts.3.up_proj.weight";
            for (String k : a.keySet()) {
                assertArrayEquals(a.get(k).getArray().toFloatArray(), b.get(k).getArray().toFloatArray(), 0f, k);
            }
            assertNotEquals(Arrays.toString(a.get(w).getArray().toFloatArray()),
                    Arrays.toString(other.get(w).getArray().toFloatArray()));
            float[] v = a.get(w).getArray().toFloatArray();
            double sq = 0;
            for (float f : v) {
                sq += f * f;
            }
            assertEquals(0.02, Math.sqrt(sq / v.length), 0.002); // N(0, initializer_range)
            assertArrayEquals(new float[] {1, 1}, Arrays.copyOf(a.get("model.norm.weight").getArray()
                    .toFloatArray(), 2), 0f);
            assertArrayEquals(new float[8], a.get("model.layers.1.mlp.gate.e_score_correction_bias").getArray()
                    .toFloatArray(), 0f);
            // large tensors are drawn in parallel chunks; the values must not depend on the scheduling
            DeepSeekForCausalLM.SeededNormal big = new DeepSeekForCausalLM.SeededNormal(7, "big", 0.02f);
            ai.djl.ndarray.types.Shape shape = new ai.djl.ndarray.types.Shape(3, 1 << 20);
            float[] x = big.initialize(m, shape, DataType.FLOAT32).toFloatArray();
            float[] y = big.initialize(m, shape, DataType.FLOAT32).toFloatArray();
            assertArrayEquals(x, y, 0f);
            assertNotEquals(x[0], x[1 << 20]); // chunks use different streams
        }
    }

    @Test
    void shardedCheckpointLoadsLikeTheSingleFile() throws Exception {
        Path dir = tmp.resolve("sharded");
        Files.createDirectories(dir);
        Files.copy(Fixtures.V3.resolve("config.json"), dir.resolve("config.json"));
        SafetensorsWriter a = new SafetensorsWriter();
        SafetensorsWriter b = new SafetensorsWriter();
        StringBuilder map = new StringBuilder();
        try (SafetensorsFile f = SafetensorsFile.open(Fixtures.V3.resolve("model.safetensors"))) {
            int i = 0;
            for (String t : f.names()) {
                boolean first = i++ % 2 == 0;
                (first ? a : b).add(t, SafetensorsDType.F32, f.info(t).shape(), f32(f.readFloats(t)));
                map.append(map.length() == 0 ? "" : ", ").append('"').append(t).append("\": \"")
                        .append(first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors")
                        .append('"');
            }
        }
        a.write(dir.resolve("model-00001-of-00002.safetensors"));
        b.write(dir.resolve("model-00002-of-00002.safetensors"));
        Files.writeString(dir.resolve("model.safetensors.index.json"),
                "{\"metadata\": {}, \"weight_map\": {" + map + "}}");
        try (NDManager m = NDManager.newBaseManager()) {
            Map<String, Parameter> one = BlockTrees.parameters(DeepSeekLoader.load(Fixtures.V3, m, DataType.FLOAT32));
            Map<String, Parameter> two = BlockTrees.parameters(DeepSeekLoader.load(dir, m, DataType.FLOAT32));
            for (String k : one.keySet()) {
                assertArrayEquals(one.get(k).getArray().toFloatArray(), two.get(k).getArray().toFloatArray(), 0f, k);
            }
        }
    }


    /** Issue 13: loaded and randomly initialized weights are libtorch's memory, not a Java buffer's (LoadedArrays). */
    @Test
    void loadedAndRandomWeightsOwnTheirMemory() throws Exception {
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            for (DataType dtype : new DataType[] {DataType.FLOAT32, DataType.FLOAT16}) {
                NDManager loaded = m.newSubManager();
                LoadedArrays.assertOwned(LoadedArrays.of(DeepSeekLoader.load(Fixtures.V3, loaded, dtype)), loaded);
            }
            NDManager random = m.newSubManager();
            DeepSeekConfig config = DeepSeekConfig.fromJson(Fixtures.V3.resolve("config.json"));
            LoadedArrays.assertOwned(LoadedArrays.of(DeepSeekForCausalLM.random(config, 7, random, DataType.FLOAT32)),
                    random);
        }
    }
}
