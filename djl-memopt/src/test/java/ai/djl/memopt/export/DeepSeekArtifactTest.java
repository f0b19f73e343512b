package ai.djl.memopt.export;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.testing.LoadedArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.training.ParameterStore;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class DeepSeekArtifactTest {

    static final Path V3 = Path.of("src/test/resources/fixtures/tiny-deepseek-v3");

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

    static float[] logits(DeepSeekForCausalLM lm, NDArray ids) {
        return lm.forward(new ParameterStore(ids.getManager(), false), new NDList(ids), false).head().toFloatArray();
    }

    @Test
    void fp16ModelRoundTripsExactly() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(V3, m, DataType.FLOAT16);
            NDArray ids = m.create(new long[] {3, 14, 15, 92, 65, 35}, new ai.djl.ndarray.types.Shape(1, 6));
            Quantizer.quantize(lm, Int4WeightOnlyConfig.builder().optGroupSize(64).build());
            float[] expected = logits(lm, ids);
            Path dir = tmp.resolve("fp16");
            QuantizedArtifact.export(lm, dir, ExportOptions.builder().optSourceModel(V3).build());
            try (SafetensorsFile st = SafetensorsFile.open(dir.resolve("model.safetensors"))) {
                assertEquals(ai.djl.memopt.safetensors.SafetensorsDType.F16,
                        st.info("model.embed_tokens.weight").dtype());
            }
            assertEquals("float16", QuantizedArtifact.verify(dir).layers()
                    .get("model.layers.0.self_attn.o_proj").weightDtype());
            DeepSeekForCausalLM loaded = QuantizedArtifact.loadDeepSeek(dir, m, DataType.FLOAT16);
            assertArrayEquals(expected, logits(loaded, ids));
        }
    }

    @Test
    void exportAndLoadDeepSeekGivesIdenticalLogits() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            NDArray ids;
            try (SafetensorsFile ref = SafetensorsFile.open(V3.resolve("reference.safetensors"))) {
                ids = ref.load(m, "input_ids");
            }
            QuantizationReport report = Quantizer.quantize(lm, Int4WeightOnlyConfig.builder().optGroupSize(32)
                    .addOverride(ai.djl.memopt.quantize.LayerOverride.use("**.kv_b_proj",
                            Int8WeightOnlyConfig.builder().build()))
                    .optIncludeLmHead(true)
                    .build());
            float[] expected = logits(lm, ids);
            Path dir = tmp.resolve("q");
            ArtifactManifest written = QuantizedArtifact.export(lm, dir,
                    ExportOptions.builder().optSourceModel(V3).optReportsJson(report.toJson().toString()).build());
            assertEquals("deepseek", written.architecture());
            assertEquals(QuantizedArtifact.sha256(V3.resolve("model.safetensors")),
                    written.sourceFiles().get("model.safetensors"));
            try (SafetensorsFile st = SafetensorsFile.open(dir.resolve("model.safetensors"))) {
                // HF-derived names: quantized projections and verbatim norms, embeddings, router
                assertTrue(st.contains("model.layers.0.self_attn.q_a_proj.qweight"));
                assertTrue(st.contains("model.layers.1.mlp.experts.3.down_proj.zeros"));
                assertTrue(st.contains("lm_head.scales"));
                assertTrue(st.contains("model.layers.1.mlp.gate.weight"));
                assertTrue(st.contains("model.embed_tokens.weight"));
                assertTrue(!st.contains("model.layers.0.self_attn.q_a_proj.weight"));
            }
            long artifactBytes = Files.size(dir.resolve("model.safetensors"));
            long sourceBytes = Files.size(V3.resolve("model.safetensors"));
            System.out.printf("V3 fixture int4 g32 (+int8 kv_b, lm_head): %d -> %d bytes on disk (%.2fx); source"
                    + " includes the MTP layer%n", sourceBytes, artifactBytes, (double) sourceBytes / artifactBytes);

            DeepSeekForCausalLM loaded = QuantizedArtifact.loadDeepSeek(dir, m, DataType.FLOAT32);
            assertInstanceOf(QuantizedLinear.class, BlockTrees.get(loaded, "model.layers.2.mlp.experts.7.up_proj"));
            assertInstanceOf(QuantizedLinear.class, BlockTrees.get(loaded, "lm_head"));
            assertArrayEquals(expected, logits(loaded, ids), "artifact must reproduce the in-memory model exactly");

            // a generic artifact is not a DeepSeek artifact
            ai.djl.nn.SequentialBlock mlp = QuantizedArtifactTest.mlp(m, 1, 256);
            QuantizedArtifact.export(mlp, tmp.resolve("mlp"), ExportOptions.builder().build());
            QuantizedArtifactException e = assertThrows(QuantizedArtifactException.class,
                    () -> QuantizedArtifact.loadDeepSeek(tmp.resolve("mlp"), m, DataType.FLOAT32));
            assertTrue(e.getMessage().contains("architecture is 'generic', not 'deepseek'"), e.getMessage());
        }
    }


    /** Issue 13: an artifact's codes, scales and float weights are loaded into libtorch's memory. */
    @Test
    void loadedArtifactOwnsItsMemory() throws Exception {
        try (NDManager m = manager.newSubManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            Quantizer.quantize(lm, Int4WeightOnlyConfig.builder().optGroupSize(32).build());
            Path dir = tmp.resolve("owned");
            QuantizedArtifact.export(lm, dir, ExportOptions.builder().optSourceModel(V3).build());
            for (DataType dtype : new DataType[] {DataType.FLOAT32, DataType.FLOAT16}) {
                NDManager loaded = m.newSubManager();
                LoadedArrays.assertOwned(LoadedArrays.of(QuantizedArtifact.loadDeepSeek(dir, loaded, dtype)), loaded);
            }
        }
    }
}
