package ai.djl.memopt.export;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.model.deepseek.TokenEmbedding;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.LayerOverride;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.modality.nlp.embedding.TrainableWordEmbedding;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Parameter;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.training.ParameterStore;
import ai.djl.training.initializer.Initializer;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.List;
import java.util.function.Consumer;
import java.util.stream.Stream;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Artifacts with quantized embedding tables (format version 2): round trips, versions, corrupt entries. */
class QuantizedEmbeddingArtifactTest {

    static final Path V3 = DeepSeekArtifactTest.V3;

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

    private static NDArray ids(NDManager m) {
        return m.create(new long[] {3, 14, 15, 92, 65, 35, 511, 0}, new Shape(2, 4));
    }

    private static JsonObject json(Path dir) throws IOException {
        return JsonParser.parseString(Files.readString(dir.resolve("quantization.json"))).getAsJsonObject();
    }

    private static void editJson(Path dir, Consumer<JsonObject> edit) throws IOException {
        JsonObject o = json(dir);
        edit.accept(o);
        Files.writeString(dir.resolve("quantization.json"), o.toString(), StandardCharsets.UTF_8);
    }

    private static void copyDir(Path from, Path to) throws IOException {
        Files.createDirectories(to);
        try (Stream<Path> s = Files.list(from)) {
            for (Path f : (Iterable<Path>) s::iterator) {
                Files.copy(f, to.resolve(f.getFileName()), StandardCopyOption.REPLACE_EXISTING);
            }
        }
    }

    private Path export(NDManager m, QuantizationConfig config, DataType type, String name, float[][] logits)
            throws IOException {
        DeepSeekForCausalLM lm = DeepSeekLoader.load(V3, m, type);
        Quantizer.quantize(lm, config);
        logits[0] = DeepSeekArtifactTest.logits(lm, ids(m));
        Path dir = tmp.resolve(name);
        QuantizedArtifact.export(lm, dir, ExportOptions.builder().optSourceModel(V3).build());
        return dir;
    }

    @Test
    void deepSeekRoundTripsWithInt8AndInt4Tables() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            Object[][] cases = {
                {Int4WeightOnlyConfig.builder().optGroupSize(32).optIncludeLmHead(true).optIncludeEmbeddings(true)
                        .build(), DataType.FLOAT32, QuantScheme.INT4_WEIGHT_ONLY, 32},
                {Int4WeightOnlyConfig.builder().optGroupSize(32).addOverride(LayerOverride.use("model.embed_tokens",
                        Int8WeightOnlyConfig.builder().build())).build(), DataType.FLOAT32,
                    QuantScheme.INT8_WEIGHT_ONLY, 64},
                {Int8WeightOnlyConfig.builder().optIncludeEmbeddings(true).build(), DataType.FLOAT16,
                    QuantScheme.INT8_WEIGHT_ONLY, 64}};
            int n = 0;
            for (Object[] c : cases) {
                float[][] expected = new float[1][];
                DataType type = (DataType) c[1];
                Path dir = export(m, (QuantizationConfig) c[0], type, "q" + n++, expected);
                JsonObject meta = json(dir);
                assertEquals(2, meta.get("format_version").getAsInt());
                JsonObject entry = meta.getAsJsonObject("embeddings").getAsJsonObject("model.embed_tokens");
                assertEquals(((QuantScheme) c[2]).id(), entry.get("scheme").getAsString());
                assertEquals((int) c[3], entry.get("group_size").getAsInt());
                assertEquals("weight", entry.get("parameter").getAsString());
                assertEquals(type == DataType.FLOAT16 ? "float16" : "float32", entry.get("weight_dtype").getAsString());
                try (SafetensorsFile st = SafetensorsFile.open(dir.resolve("model.safetensors"))) {
                    assertFalse(st.contains("model.embed_tokens.weight"));
                    boolean int8 = c[2] == QuantScheme.INT8_WEIGHT_ONLY;
                    assertEquals(int8 ? new Shape(512, 64) : new Shape(512, 32),
                            st.info("model.embed_tokens.qweight").djlShape());
                    assertEquals(int8 ? new Shape(512, 1) : new Shape(512, 2),
                            st.info("model.embed_tokens.scales").djlShape());
                    assertEquals(!int8, st.contains("model.embed_tokens.zeros"));
                }
                ArtifactManifest manifest = QuantizedArtifact.verify(dir);
                assertEquals(c[2], manifest.embeddings().get("model.embed_tokens").scheme());
                // every tool's path into a model directory
                DeepSeekForCausalLM loaded = ModelDirectories.loadDeepSeek(dir, m, type);
                QuantizedEmbedding qe = assertInstanceOf(QuantizedEmbedding.class,
                        BlockTrees.get(loaded, "model.embed_tokens"));
                assertEquals(type, qe.outputType());
                assertEquals(type, loaded.dataType());
                assertArrayEquals(expected[0], DeepSeekArtifactTest.logits(loaded, ids(m)),
                        "artifact must reproduce the in-memory model exactly: " + c[0]);
                // loading into a freshly loaded float model of the same architecture does the same
                DeepSeekForCausalLM fresh = DeepSeekLoader.load(V3, m, type);
                QuantizedArtifact.load(dir, fresh);
                assertArrayEquals(expected[0], DeepSeekArtifactTest.logits(fresh, ids(m)));
            }
        }
    }

    @Test
    void withoutQuantizedTablesTheArtifactStaysVersionOne() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            Path dir = export(m, Int8WeightOnlyConfig.builder().build(), DataType.FLOAT32, "v1", new float[1][]);
            JsonObject meta = json(dir);
            assertEquals(1, meta.get("format_version").getAsInt());
            assertFalse(meta.has("embeddings"));
            assertTrue(QuantizedArtifact.verify(dir).embeddings().isEmpty());
            // a version-1 manifest cannot carry embeddings
            editJson(dir, o -> o.add("embeddings", new JsonObject()));
            QuantizedArtifactException e = assertThrows(QuantizedArtifactException.class,
                    () -> QuantizedArtifact.verify(dir));
            assertTrue(e.getMessage().contains("'embeddings' needs format_version 2 or later, the file says 1"),
                    e.getMessage());
        }
    }

    private String loadError(Path dir, NDManager m) throws IOException {
        DeepSeekForCausalLM fresh = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
        String message = assertThrows(IOException.class, () -> QuantizedArtifact.load(dir, fresh)).getMessage();
        // nothing was changed before the error
        assertInstanceOf(TokenEmbedding.class, BlockTrees.get(fresh, "model.embed_tokens"));
        assertInstanceOf(Linear.class, BlockTrees.get(fresh, "model.layers.0.self_attn.o_proj"));
        assertThrows(IOException.class, () -> QuantizedArtifact.loadDeepSeek(dir, m, DataType.FLOAT32));
        return message;
    }

    @Test
    void corruptOrMismatchedEmbeddingEntriesAreReportedByName() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            Path dir = export(m, Int8WeightOnlyConfig.builder().optIncludeEmbeddings(true).build(), DataType.FLOAT32,
                    "bad", new float[1][]);
            Path pristine = tmp.resolve("pristine");
            copyDir(dir, pristine);
            String entry = "model.embed_tokens";

            // the manifest says int4 g32, the tensors are int8
            editJson(dir, o -> {
                JsonObject e = o.getAsJsonObject("embeddings").getAsJsonObject(entry);
                e.addProperty("scheme", "int4");
                e.addProperty("group_size", 32);
            });
            String err = loadError(dir, m);
            assertTrue(err.contains("tensor 'model.embed_tokens.qweight': expected U8 (512, 32), got I8 (512, 64)"),
                    err);
            copyDir(pristine, dir);

            // a table of another shape
            editJson(dir, o -> {
                com.google.gson.JsonArray shape = new com.google.gson.JsonArray();
                shape.add(1024);
                shape.add(64);
                o.getAsJsonObject("embeddings").getAsJsonObject(entry).add("shape", shape);
            });
            err = loadError(dir, m);
            assertTrue(err.contains("embedding 'model.embed_tokens': artifact table shape (1024, 64) but the block's"
                    + " embedding has (512, 64)"), err);
            copyDir(pristine, dir);

            // an entry that names a Linear
            editJson(dir, o -> {
                JsonObject e = o.getAsJsonObject("embeddings").remove(entry).getAsJsonObject();
                o.getAsJsonObject("embeddings").add("lm_head", e);
            });
            err = loadError(dir, m);
            assertTrue(err.contains("embedding 'lm_head': the block has a Linear there, not an embedding table"), err);
            copyDir(pristine, dir);

            // bad fields
            editJson(dir, o -> o.getAsJsonObject("embeddings").getAsJsonObject(entry).remove("parameter"));
            err = assertThrows(QuantizedArtifactException.class, () -> QuantizedArtifact.verify(dir)).getMessage();
            assertTrue(err.contains("embedding 'model.embed_tokens': missing field 'parameter'"), err);
            copyDir(pristine, dir);
            editJson(dir, o -> o.getAsJsonObject("embeddings").getAsJsonObject(entry).addProperty("group_size", 48));
            err = assertThrows(QuantizedArtifactException.class, () -> QuantizedArtifact.verify(dir)).getMessage();
            assertTrue(err.contains("bad group_size 48 for int8 and hidden size 64"), err);
            copyDir(pristine, dir);

            // the weights file of another export (same names, other bytes): the checksum catches it
            Files.write(dir.resolve("model.safetensors"), new byte[] {1, 2, 3}, java.nio.file.StandardOpenOption.APPEND);
            err = loadError(dir, m);
            assertTrue(err.contains("sha256 mismatch"), err);
            copyDir(pristine, dir);
            assertEquals(2, QuantizedArtifact.verify(dir).formatVersion());
        }
    }

    /** DJL's own Embedding in a generic block: exported and loaded like the DeepSeek table. */
    @Test
    void djlEmbeddingRoundTrips() throws IOException {
        try (NDManager m = manager.newSubManager()) {
            m.getEngine().setRandomSeed(3);
            NDArray weights = m.randomNormal(0, 1f, new Shape(30, 64), DataType.FLOAT32);
            NDArray ids = m.create(new long[] {0, 7, 29, 7}, new Shape(1, 4));
            SequentialBlock net = net(m, weights);
            Quantizer.quantize(net, Int4WeightOnlyConfig.builder().optGroupSize(32).optIncludeEmbeddings(true).build());
            float[] expected = net.forward(new ParameterStore(m, false), new NDList(ids), false).head().toFloatArray();
            Path dir = tmp.resolve("djl");
            QuantizedArtifact.export(net, dir, ExportOptions.builder().build());
            assertEquals("embedding", QuantizedArtifact.verify(dir).embeddings().get("0").parameter());
            SequentialBlock fresh = net(m, m.zeros(new Shape(30, 64)));
            QuantizedArtifact.load(dir, fresh);
            assertInstanceOf(QuantizedEmbedding.class, BlockTrees.get(fresh, "0"));
            assertArrayEquals(expected,
                    fresh.forward(new ParameterStore(m, false), new NDList(ids), false).head().toFloatArray());
        }
    }

    private static SequentialBlock net(NDManager m, NDArray weights) {
        List<String> items = new ArrayList<>();
        for (int i = 0; i < weights.getShape().get(0); i++) {
            items.add("t" + i);
        }
        SequentialBlock net = new SequentialBlock().add(TrainableWordEmbedding.fromPretrained(weights, items))
                .add(Linear.builder().setUnits(8).build());
        net.setInitializer(Initializer.ONES, Parameter.Type.WEIGHT);
        net.initialize(m, DataType.FLOAT32, new Shape(1, 4));
        return net;
    }
}
