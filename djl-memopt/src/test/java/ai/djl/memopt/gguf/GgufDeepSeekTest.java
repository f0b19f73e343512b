package ai.djl.memopt.gguf;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.testing.LoadedArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.training.ParameterStore;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/** Export to GGUF and load back, against the transformers fixtures and the in-memory quantized model. */
class GgufDeepSeekTest {

    static final Path V3 = Path.of("src/test/resources/fixtures/tiny-deepseek-v3");
    static final Path V2 = Path.of("src/test/resources/fixtures/tiny-deepseek-v2");

    @TempDir
    Path tmp;

    @ParameterizedTest
    @ValueSource(strings = {"tiny-deepseek-v3", "tiny-deepseek-v2"})
    void f32ExportLoadsBackWithTheSameLogits(String fixture) throws Exception {
        Path dir = V3.getParent().resolve(fixture);
        Path file = tmp.resolve(fixture + ".gguf");
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(dir.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM source = DeepSeekLoader.load(dir, m, DataType.FLOAT32);
            GgufExporter.Report r = GgufExporter.export(source, dir, GgmlType.F32, file, null);
            assertEquals("placeholder", r.tokenizerPre());
            DeepSeekForCausalLM loaded = GgufLoader.load(file, m, DataType.FLOAT32, true);
            assertEquals(source.config().toJson().replace("\"rope_interleave\": false", "\"rope_interleave\": true"),
                    loaded.config().toJson());
            NDArray ids = ref.load(m, "input_ids");
            NDArray a = logits(source, ids);
            NDArray b = logits(loaded, ids);
            assertEquals(0f, a.sub(b).abs().max().getFloat(), "F32 export changed the logits");
            float d = b.sub(ref.load(m, "logits")).abs().max().getFloat();
            assertTrue(d < 1e-4, "logits differ from transformers' by " + d);
            float loss = CausalLmLoss.mean(b, ids).getFloat();
            assertEquals(ref.load(m, "loss").getFloat(), loss, 1e-5);
        }
    }

    @ParameterizedTest
    @ValueSource(strings = {"Q8_0", "Q4_0", "F16"})
    void quantizedExportLoadsNativelyAndComputesTheSame(String typeName) throws Exception {
        GgmlType type = GgmlType.valueOf(typeName);
        Path file = tmp.resolve("v3-" + typeName + ".gguf");
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(V3.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM ours = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            NDArray ids = ref.load(m, "input_ids");
            NDArray floatLogits = logits(ours, ids);
            List<String> blocks = GgufQuantizer.quantize(ours, type);
            GgufExporter.export(ours, V3, type, file, null);
            DeepSeekForCausalLM loaded = GgufLoader.load(file, m, DataType.FLOAT32, true);
            if (type.isQuantized()) {
                assertTrue(blocks.contains("model.layers.1.mlp.experts.3.down_proj.weight"), blocks.toString());
                QuantScheme scheme = type == GgmlType.Q8_0 ? QuantScheme.INT8_WEIGHT_ONLY : QuantScheme.INT4_WEIGHT_ONLY;
                QuantizedLinear q = (QuantizedLinear) BlockTrees.get(loaded, "model.layers.1.mlp.experts.3.down_proj");
                assertEquals(scheme, q.quantizedWeight().scheme());
                assertEquals(32, q.quantizedWeight().groupSize());
                assertTrue(BlockTrees.get(loaded, "model.embed_tokens") instanceof QuantizedEmbedding);
                assertTrue(BlockTrees.get(loaded, "lm_head") instanceof QuantizedLinear);
            }
            NDArray a = logits(ours, ids);
            NDArray b = logits(loaded, ids);
            assertEquals(0f, a.sub(b).abs().max().getFloat(), "the loaded model computes differently");
            assertEquals(CausalLmLoss.mean(a, ids).getFloat(), CausalLmLoss.mean(b, ids).getFloat());
            float err = a.sub(floatLogits).abs().max().getFloat();
            System.out.printf("%s: max |logits - float logits| = %.3g%n", type, err);
            assertTrue(err > 0 && err < (type == GgmlType.Q4_0 ? 0.5 : 0.05), type + " error " + err);
            // a second export of the loaded model copies the blocks: the same bytes
            Path again = tmp.resolve("again.gguf");
            GgufExporter.export(loaded, V3, type, again, null);
            assertArrayEquals(java.nio.file.Files.readAllBytes(file), java.nio.file.Files.readAllBytes(again));
        }
    }

    @Test
    void ropeHalvesArePermutedToLlamaCppsAdjacentPairs() throws Exception {
        // the V3 fixture's weights read as a model whose rotary embedding rotates halves (rope_interleave false):
        // llama.cpp rotates adjacent pairs, so the export permutes the rotary rows, and the loaded model (adjacent
        // pairs) must compute what the source computes
        Path dir = java.nio.file.Files.createDirectories(tmp.resolve("halves"));
        for (String f : new String[] {"model.safetensors", "generation_config.json"}) {
            java.nio.file.Files.copy(V3.resolve(f), dir.resolve(f));
        }
        String config = java.nio.file.Files.readString(V3.resolve("config.json"));
        assertTrue(config.contains("\"rope_interleave\": true"));
        java.nio.file.Files.writeString(dir.resolve("config.json"),
                config.replace("\"rope_interleave\": true", "\"rope_interleave\": false"));
        Path file = tmp.resolve("halves.gguf");
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM source = DeepSeekLoader.load(dir, m, DataType.FLOAT32);
            assertTrue(!source.config().ropeInterleave());
            GgufExporter.export(source, dir, GgmlType.F32, file, null);
            DeepSeekForCausalLM loaded = GgufLoader.load(file, m, DataType.FLOAT32, true);
            assertTrue(loaded.config().ropeInterleave());
            NDArray ids = m.create(new long[] {1, 5, 9, 200, 17, 3, 44, 101, 7, 7}).reshape(1, 10);
            NDArray a = logits(source, ids);
            float d = a.sub(logits(loaded, ids)).abs().max().getFloat();
            assertTrue(d < 1e-5, "permuted rotary rows: logits differ by " + d);
            DeepSeekForCausalLM interleaved = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            float other = a.sub(logits(interleaved, ids)).abs().max().getFloat();
            assertTrue(other > 1e-3, "the two rotary layouts should differ (" + other + ")");
        }
    }

    @Test
    void floatLoadOfAQuantizedFileDequantizes() throws Exception {
        Path file = tmp.resolve("v3-q4.gguf");
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM ours = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            GgufQuantizer.quantize(ours, GgmlType.Q4_0);
            GgufExporter.export(ours, V3, GgmlType.Q4_0, file, null);
            DeepSeekForCausalLM plain = GgufLoader.load(file, m, DataType.FLOAT32, false);
            assertTrue(BlockTrees.walk(plain).values().stream().noneMatch(b -> b instanceof QuantizedLinear));
            NDArray ids = m.create(new long[] {1, 5, 9, 200, 17, 3}).reshape(1, 6);
            float d = logits(ours, ids).sub(logits(plain, ids)).abs().max().getFloat();
            assertTrue(d < 1e-5, "dequantized load differs by " + d);
        }
    }

    static NDArray logits(DeepSeekForCausalLM lm, NDArray ids) {
        return lm.forward(new ParameterStore(ids.getManager(), false), new NDList(ids), false).head();
    }

    static DeepSeekConfig config(DeepSeekForCausalLM lm) {
        return lm.config();
    }


    /** Issue 13: GGUF weights, float or kept in their blocks, are libtorch's memory, not a Java buffer's. */
    @ParameterizedTest
    @ValueSource(strings = {"F32", "Q8_0", "Q4_0"})
    void loadedWeightsOwnTheirMemory(String typeName) throws Exception {
        GgmlType type = GgmlType.valueOf(typeName);
        Path file = tmp.resolve("owned-" + typeName + ".gguf");
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            DeepSeekForCausalLM ours = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            if (type != GgmlType.F32) {
                GgufQuantizer.quantize(ours, type);
            }
            GgufExporter.export(ours, V3, type, file, null);
            NDManager loaded = m.newSubManager();
            LoadedArrays.assertOwned(LoadedArrays.of(GgufLoader.load(file, loaded, DataType.FLOAT32, true)), loaded);
            NDManager dequantized = m.newSubManager();
            LoadedArrays.assertOwned(LoadedArrays.of(GgufLoader.load(file, dequantized, DataType.FLOAT32, false)),
                    dequantized);
        }
    }

    /** GgufQuantizer writes the rounded values into the model's own weights, not over a Java buffer. */
    @Test
    void quantizerKeepsTheWeightsInTheirOwnMemory() throws Exception {
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            NDManager loaded = m.newSubManager();
            DeepSeekForCausalLM ours = DeepSeekLoader.load(V3, loaded, DataType.FLOAT32);
            GgufQuantizer.quantize(ours, GgmlType.Q4_0);
            LoadedArrays.assertOwned(LoadedArrays.of(ours), loaded);
        }
    }
}
