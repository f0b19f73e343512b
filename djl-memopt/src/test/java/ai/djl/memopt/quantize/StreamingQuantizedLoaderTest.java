package ai.djl.memopt.quantize;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.Halfs;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.memopt.testing.LoadedArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.function.BiFunction;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * The streamed model must be the one {@link DeepSeekLoader#load} + {@link Quantizer#quantize} gives: same codes,
 * scales and zero points bit for bit, same logits exactly, same report, for F32 and BF16 (sharded) checkpoints.
 */
class StreamingQuantizedLoaderTest {

    static final Path V3 = DeepSeekQuantizationTest.V3;

    @TempDir Path tmp;

    private static final QuantizationConfig INT8 = Int8WeightOnlyConfig.builder().build();
    private static final QuantizationConfig INT4 = Int4WeightOnlyConfig.builder().optGroupSize(32).build();

    /** Streams {@code dir} and compares everything with load-then-quantize. */
    private static void assertSameAsLoadThenQuantize(Path dir, DataType dtype, QuantizationConfig config)
            throws IOException {
        try (NDManager m = NDManager.newBaseManager();
                NDManager refManager = m.newSubManager();
                NDManager streamManager = m.newSubManager()) {
            DeepSeekForCausalLM reference = DeepSeekLoader.load(dir, refManager, dtype);
            QuantizationReport refReport = Quantizer.quantize(reference, config);
            StreamingQuantizedLoader.Result streamed = StreamingQuantizedLoader.load(dir, streamManager, dtype, config);
            DeepSeekForCausalLM lm = streamed.model();
            // nothing but the model's arrays is left: no float weight, placeholder or temporary
            assertEquals(refManager.getManagedArrays().size(), streamManager.getManagedArrays().size());

            Map<String, Block> refBlocks = BlockTrees.walk(reference);
            Map<String, Block> blocks = BlockTrees.walk(lm);
            assertEquals(refBlocks.keySet(), blocks.keySet());
            int quantized = 0;
            for (Map.Entry<String, Block> e : refBlocks.entrySet()) {
                Block b = blocks.get(e.getKey());
                assertEquals(e.getValue().getClass(), b.getClass(), e.getKey());
                if (b instanceof QuantizedLinear) {
                    QuantizedTensor want = ((QuantizedLinear) e.getValue()).quantizedWeight();
                    QuantizedTensor got = ((QuantizedLinear) b).quantizedWeight();
                    assertEquals(want.scheme(), got.scheme(), e.getKey());
                    assertEquals(want.groupSize(), got.groupSize(), e.getKey());
                    assertArrayEquals(want.data().toByteArray(), got.data().toByteArray(), e.getKey());
                    assertArrayEquals(want.scales().toFloatArray(), got.scales().toFloatArray(), e.getKey());
                    if (want.zeros().isPresent()) {
                        assertArrayEquals(want.zeros().get().toByteArray(), got.zeros().get().toByteArray());
                    }
                    assertEquals(dtype, ((QuantizedLinear) b).weightType());
                    quantized++;
                }
            }
            assertTrue(quantized > 20, "only " + quantized + " layers quantized");
            Map<String, Parameter> refParams = BlockTrees.parameters(reference);
            Map<String, Parameter> params = BlockTrees.parameters(lm);
            assertEquals(refParams.keySet(), params.keySet());
            for (Map.Entry<String, Parameter> p : refParams.entrySet()) {
                NDArray a = params.get(p.getKey()).getArray();
                assertEquals(dtype, a.getDataType(), p.getKey());
                assertArrayEquals(p.getValue().getArray().toFloatArray(), a.toFloatArray(), p.getKey());
            }

            QuantizationReport report = streamed.report();
            assertEquals(refReport.skipped(), report.skipped());
            assertEquals(refReport.layers().size(), report.layers().size());
            for (int i = 0; i < report.layers().size(); i++) {
                QuantizationReport.Layer want = refReport.layers().get(i);
                QuantizationReport.Layer got = report.layers().get(i);
                assertEquals(want.path(), got.path());
                assertEquals(want.groupSize(), got.groupSize(), want.path());
                assertEquals(want.bytesBefore(), got.bytesBefore(), want.path());
                assertEquals(want.bytesAfter(), got.bytesAfter(), want.path());
                assertEquals(want.sqnrDb(), got.sqnrDb(), 1e-9, want.path());
                assertEquals(want.note(), got.note(), want.path());
            }

            NDArray ids = DeepSeekQuantizationTest.ids(m, V3);
            float[] want = DeepSeekQuantizationTest.logits(reference, ids).toFloatArray();
            float[] got = DeepSeekQuantizationTest.logits(lm, ids).toFloatArray();
            assertArrayEquals(want, got, 0f, "logits must be identical");
            // and the model is really quantized: not the float model's logits
            try (NDManager f = NDManager.newBaseManager()) {
                DeepSeekForCausalLM fp = DeepSeekLoader.load(dir, f, dtype);
                NDArray fpIds = DeepSeekQuantizationTest.ids(f, V3);
                float[] exact = DeepSeekQuantizationTest.logits(fp, fpIds).toFloatArray();
                double diff = 0;
                for (int i = 0; i < exact.length; i++) {
                    diff = Math.max(diff, Math.abs(exact[i] - got[i]));
                }
                assertTrue(diff > 0, "streamed logits equal the float model's");
            }
        }
    }

    @Test
    void int8StreamsToTheQuantizersModel() throws IOException {
        assertSameAsLoadThenQuantize(V3, DataType.FLOAT32, INT8);
    }

    @Test
    void int4StreamsToTheQuantizersModel() throws IOException {
        assertSameAsLoadThenQuantize(V3, DataType.FLOAT32, INT4);
    }

    @Test
    void int4Fp16ModelStreamsToTheQuantizersModel() throws IOException {
        assertSameAsLoadThenQuantize(V3, DataType.FLOAT16, INT4);
    }

    @Test
    void shardedBf16CheckpointStreams() throws IOException {
        Path dir = copyFixture("bf16", SafetensorsDType.BF16, 3, (n, v) -> v);
        try (HfCheckpoint ckpt = HfCheckpoint.open(dir)) {
            assertEquals(3, ckpt.files().size());
            assertEquals(SafetensorsDType.BF16, ckpt.info("model.layers.1.self_attn.o_proj.weight").dtype());
        }
        assertSameAsLoadThenQuantize(dir, DataType.FLOAT32, INT4);
        assertSameAsLoadThenQuantize(dir, DataType.FLOAT32, INT8);
    }

    @Test
    void f16CheckpointStreams() throws IOException {
        Path dir = copyFixture("f16", SafetensorsDType.F16, 1, (n, v) -> v);
        assertSameAsLoadThenQuantize(dir, DataType.FLOAT16, INT8);
    }

    @Test
    void overridesAndFilterAreHonoured() throws IOException {
        QuantizationConfig config = Int4WeightOnlyConfig.builder().optGroupSize(32).optIncludeLmHead(true)
                .addOverride(LayerOverride.skip("model.layers.0.**"))
                .addOverride(LayerOverride.use("**.o_proj", INT8)).build();
        assertSameAsLoadThenQuantize(V3, DataType.FLOAT32, config);
        try (NDManager m = NDManager.newBaseManager()) {
            StreamingQuantizedLoader.Result r = StreamingQuantizedLoader.load(V3, m, DataType.FLOAT32, config);
            assertInstanceOf(QuantizedLinear.class, BlockTrees.get(r.model(), "lm_head"));
            assertEquals(QuantScheme.INT8_WEIGHT_ONLY, r.report().layer("model.layers.1.self_attn.o_proj").scheme());
            assertTrue(r.report().skipped().containsKey("model.layers.0.self_attn.q_a_proj"));
        }
    }

    @Test
    void mtpLayerIsSkipped() throws IOException {
        Path dir = copyFixture("mtp", SafetensorsDType.F32, 1, (n, v) -> v,
                "model.layers.3.self_attn.o_proj.weight", "model.layers.3.eh_proj.weight");
        assertSameAsLoadThenQuantize(dir, DataType.FLOAT32, INT4);
    }

    @Test
    void calibratedMethodsAreRejected() {
        try (NDManager m = NDManager.newBaseManager()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> StreamingQuantizedLoader.load(V3, m, DataType.FLOAT32,
                            Int4WeightOnlyConfig.builder().optMethod(QuantMethod.AWQ).build()));
            assertTrue(e.getMessage().contains("awq") && e.getMessage().contains("RTN"), e.getMessage());
            QuantizationConfig gptq = Int8WeightOnlyConfig.builder().optMethod(QuantMethod.GPTQ).build();
            e = assertThrows(IllegalArgumentException.class, () -> StreamingQuantizedLoader.load(V3, m,
                    DataType.FLOAT32, Int4WeightOnlyConfig.builder().addOverride(LayerOverride.use("**.o_proj", gptq))
                            .build()));
            assertTrue(e.getMessage().contains("**.o_proj") && e.getMessage().contains("gptq"), e.getMessage());
        }
    }

    @Test
    void bf16ModelTypeIsRejected() {
        try (NDManager m = NDManager.newBaseManager()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> StreamingQuantizedLoader.load(V3, m, DataType.BFLOAT16, INT4));
            assertTrue(e.getMessage().contains("FLOAT32 or FLOAT16") && e.getMessage().contains("bfloat16"),
                    e.getMessage());
        }
    }

    @Test
    void missingQuantizedTensorIsNamed() throws IOException {
        String t = "model.layers.2.mlp.experts.5.down_proj.weight";
        Path dir = copyFixture("missing", SafetensorsDType.F32, 1, (n, v) -> n.equals(t) ? null : v);
        try (NDManager m = NDManager.newBaseManager()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> StreamingQuantizedLoader.load(dir, m, DataType.FLOAT32, INT4));
            assertTrue(e.getMessage().contains("missing tensor '" + t + "'"), e.getMessage());
        }
    }

    @Test
    void wrongShapeOfAQuantizedTensorNamesFileAndTensor() throws IOException {
        String t = "model.layers.1.self_attn.o_proj.weight";
        Path dir = copyFixture("shape", SafetensorsDType.F32, 1, (n, v) -> n.equals(t) ? java.util.Arrays.copyOf(v,
                64 * 32) : v);
        try (NDManager m = NDManager.newBaseManager()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> StreamingQuantizedLoader.load(dir, m, DataType.FLOAT32, INT4));
            assertEquals(0, m.getManagedArrays().size(), "a failed load frees what it allocated");
            assertTrue(e.getMessage().contains(t) && e.getMessage().contains("model.safetensors")
                    && e.getMessage().contains("(64, 32)") && e.getMessage().contains("(64, 64)"), e.getMessage());
        }
    }

    @Test
    void unexpectedTensorIsNamed() throws IOException {
        Path dir = copyFixture("unexpected", SafetensorsDType.F32, 1, (n, v) -> v, "model.layers.1.mlp.bogus.weight");
        try (NDManager m = NDManager.newBaseManager()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> StreamingQuantizedLoader.load(dir, m, DataType.FLOAT32, INT8));
            assertTrue(e.getMessage().contains("unexpected tensor 'model.layers.1.mlp.bogus.weight'"),
                    e.getMessage());
        }
    }

    @Test
    void notADirectoryAndNoConfig() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            IOException e = assertThrows(IOException.class,
                    () -> StreamingQuantizedLoader.load(tmp.resolve("nope"), m, DataType.FLOAT32, INT4));
            assertTrue(e.getMessage().contains("not a directory"), e.getMessage());
            Path empty = Files.createDirectories(tmp.resolve("empty"));
            e = assertThrows(IOException.class, () -> StreamingQuantizedLoader.load(empty, m, DataType.FLOAT32, INT4));
            assertTrue(e.getMessage().contains("config.json"), e.getMessage());
        }
    }

    /**
     * Copies the V3 fixture as {@code dtype} into {@code shards} files (with an index when more than one), each tensor
     * through {@code edit} (null drops it); {@code extra} tensors are added as 2-element F32 vectors.
     */
    private Path copyFixture(String name, SafetensorsDType dtype, int shards, BiFunction<String, float[], float[]> edit,
            String... extra) throws IOException {
        Path dir = Files.createDirectories(tmp.resolve(name));
        Files.copy(V3.resolve("config.json"), dir.resolve("config.json"));
        List<SafetensorsWriter> writers = new ArrayList<>();
        for (int i = 0; i < shards; i++) {
            writers.add(new SafetensorsWriter());
        }
        JsonObject weightMap = new JsonObject();
        int k = 0;
        try (SafetensorsFile f = SafetensorsFile.open(V3.resolve("model.safetensors"))) {
            for (String t : f.names()) {
                float[] v = edit.apply(t, f.readFloats(t));
                if (v == null) {
                    continue;
                }
                long[] shape = f.info(t).shape();
                if (v.length != f.info(t).numel()) {
                    shape = new long[] {64, v.length / 64};
                }
                int shard = k++ % shards;
                writers.get(shard).add(t, dtype, shape, encode(v, dtype));
                weightMap.addProperty(t, shardName(shard, shards));
            }
        }
        for (String t : extra) {
            writers.get(0).add(t, SafetensorsDType.F32, new long[] {2}, encode(new float[] {1, 2}, SafetensorsDType.F32));
            weightMap.addProperty(t, shardName(0, shards));
        }
        for (int i = 0; i < shards; i++) {
            writers.get(i).write(dir.resolve(shardName(i, shards)));
        }
        if (shards > 1) {
            JsonObject index = new JsonObject();
            index.add("metadata", new JsonObject());
            index.add("weight_map", weightMap);
            Files.writeString(dir.resolve(HfCheckpoint.INDEX_FILE), index.toString(), StandardCharsets.UTF_8);
        }
        return dir;
    }

    private static String shardName(int i, int n) {
        return n == 1 ? HfCheckpoint.SINGLE_FILE : String.format("model-%05d-of-%05d.safetensors", i + 1, n);
    }

    private static ByteBuffer encode(float[] v, SafetensorsDType dtype) {
        ByteBuffer b = ByteBuffer.allocate(v.length * (dtype == SafetensorsDType.F32 ? 4 : 2))
                .order(ByteOrder.LITTLE_ENDIAN);
        for (float f : v) {
            if (dtype == SafetensorsDType.F32) {
                b.putFloat(f);
            } else if (dtype == SafetensorsDType.BF16) {
                b.putShort(Halfs.floatToBf16(f));
            } else {
                b.putShort(Halfs.floatToF16(f));
            }
        }
        return b.flip();
    }


    /** Issue 13: the streamed model's float weights and codes are libtorch's memory, not a Java buffer's. */
    @Test
    void streamedModelOwnsItsMemory() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            for (QuantizationConfig config : new QuantizationConfig[] {INT8, INT4}) {
                NDManager loaded = m.newSubManager();
                StreamingQuantizedLoader.Result r = StreamingQuantizedLoader.load(V3, loaded, DataType.FLOAT32, config);
                LoadedArrays.assertOwned(LoadedArrays.of(r.model()), loaded);
            }
        }
    }
}
