package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.export.ArtifactManifest;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Runs {@code memopt quantize} in-process on the transformers DeepSeek-V3 fixture of the library module. */
class QuantizeCommandTest {

    static final Path V3 = Path.of("../djl-memopt/src/test/resources/fixtures/tiny-deepseek-v3");

    @TempDir
    Path tmp;

    private String[] lastOut = new String[2];

    private int run(String... args) {
        CliRun r = CliRun.run(args);
        lastOut[0] = r.out;
        lastOut[1] = r.err;
        return r.exitCode;
    }

    @Test
    void int8ArtifactMatchesTheLibrary() throws Exception {
        Path out = tmp.resolve("q8");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "int8", "--out", out.toString(),
                "--json"), lastOut[1]);
        JsonObject json = JsonParser.parseString(lastOut[0].trim()).getAsJsonObject();
        assertEquals(72, json.get("quantized_layers").getAsInt());
        assertTrue(json.get("artifact_bytes").getAsLong() < json.get("source_bytes").getAsLong() / 2);
        ArtifactManifest manifest = QuantizedArtifact.verify(out);
        assertEquals(QuantScheme.INT8_WEIGHT_ONLY, manifest.layers().get("model.layers.0.self_attn.o_proj").scheme());
        assertEquals(QuantizedArtifact.sha256(V3.resolve("model.safetensors")),
                manifest.sourceFiles().get("model.safetensors"));
        // the CLI's artifact computes exactly what quantizing in memory with the library computes
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lib = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            Quantizer.quantize(lib, Int8WeightOnlyConfig.builder().build());
            DeepSeekForCausalLM cli = QuantizedArtifact.loadDeepSeek(out, m, DataType.FLOAT32);
            var ids = m.create(new long[] {1, 5, 9, 100, 511, 7}, new Shape(1, 6));
            ParameterStore ps = new ParameterStore(m, false);
            assertArrayEquals(lib.forward(ps, new NDList(ids), false).head().toFloatArray(),
                    cli.forward(ps, new NDList(ids), false).head().toFloatArray());
        }
    }

    @Test
    void int4AwqWithIdsCalibrationAndHumanReport() throws Exception {
        Path calib = tmp.resolve("calib.ids");
        Files.writeString(calib, "1 5 9 13 100 200 300 400 17 18 19 20\n2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n");
        Path out = tmp.resolve("q4");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "int4", "--group-size", "32",
                "--method", "awq", "--awq-grid", "4", "--calibration", calib.toString(), "--include-lm-head", "--out",
                out.toString()),
                lastOut[1]);
        assertTrue(lastOut[0].contains("lm_head") && lastOut[0].contains(" awq "), lastOut[0]);
        assertTrue(lastOut[0].contains("wrote " + out), lastOut[0]);
        ArtifactManifest manifest = QuantizedArtifact.verify(out);
        assertEquals(32, manifest.layers().get("lm_head").groupSize());
        assertEquals("awq", manifest.layers().get("model.layers.0.self_attn.q_a_proj").method());
    }

    @Test
    void int8GptqArtifactRecordsTheMethodAndLoads() throws Exception {
        Path calib = tmp.resolve("calib.ids");
        Files.writeString(calib, "1 5 9 13 100 200 300 400 17 18 19 20 21 22 23 24\n");
        Path out = tmp.resolve("g8");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "int8", "--method", "gptq",
                "--calibration", calib.toString(), "--out", out.toString(), "--json"), lastOut[1]);
        ArtifactManifest manifest = QuantizedArtifact.verify(out);
        assertEquals("gptq", manifest.layers().get("model.layers.0.self_attn.q_a_proj").method());
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = QuantizedArtifact.loadDeepSeek(out, m, DataType.FLOAT32);
            assertEquals(ai.djl.memopt.quantize.QuantMethod.GPTQ, ((ai.djl.memopt.quantize.QuantizedLinear)
                    ai.djl.memopt.nn.Blocks.get(lm, "model.layers.0.self_attn.q_a_proj")).method());
        }
    }

    @Test
    void twoFourPruneOnlyIsStoredCompactly() throws Exception {
        Path out = tmp.resolve("p24");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "none", "--prune", "2:4", "--out",
                out.toString(), "--json"), lastOut[1]);
        JsonObject json = JsonParser.parseString(lastOut[0].trim()).getAsJsonObject();
        assertEquals(0.5, json.getAsJsonObject("pruning").get("overall_sparsity").getAsDouble(), 1e-9);
        ArtifactManifest manifest = QuantizedArtifact.verify(out);
        assertTrue(manifest.sparse24().containsKey("model.layers.1.mlp.experts.0.down_proj"));
        // every pruned layer's input width is a multiple of 8 here, so all are stored compactly
        assertEquals(json.getAsJsonObject("pruning").getAsJsonArray("layers").size(), manifest.sparse24().size());
        assertTrue(manifest.layers().isEmpty());
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = QuantizedArtifact.loadDeepSeek(out, m, DataType.FLOAT32);
            float[] w = lm.getParameters().stream().filter(p -> p.getKey().contains("experts"))
                    .findFirst().orElseThrow().getValue().getArray().toFloatArray();
            int zeros = 0;
            for (float v : w) {
                zeros += v == 0 ? 1 : 0;
            }
            assertEquals(w.length / 2, zeros);
        }
    }

    @Test
    void pruneAndQuantizeStoresSkippedPrunedLayersCompactly() throws Exception {
        Path out = tmp.resolve("p24q4");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "int4", "--group-size", "32",
                "--prune", "2:4", "--out", out.toString()), lastOut[1]);
        ArtifactManifest manifest = QuantizedArtifact.verify(out);
        // kv_b_proj reads the 16-wide latent: too narrow for int4 g32, so it stays float, pruned and compact
        assertTrue(manifest.sparse24().containsKey("model.layers.0.self_attn.kv_b_proj"));
        assertTrue(manifest.layers().containsKey("model.layers.0.self_attn.o_proj"));
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = QuantizedArtifact.loadDeepSeek(out, m, DataType.FLOAT32);
            float[] w = ((ai.djl.memopt.quantize.QuantizedLinear) ai.djl.memopt.nn.Blocks.get(lm,
                    "model.layers.0.self_attn.o_proj")).weight(m).toFloatArray();
            for (int g = 0; g < w.length / 4; g++) {
                int zeros = 0;
                for (int j = 4 * g; j < 4 * g + 4; j++) {
                    zeros += w[j] == 0 ? 1 : 0;
                }
                assertTrue(zeros >= 2, "2:4 pattern survives int4 quantization, group " + g);
            }
        }
    }

    /**
     * {@code --include-embeddings}: streamed int4 (RTN) with an int8 table, and in-memory GPTQ with an int4 table; each
     * artifact computes what the library computes in memory, and {@code generate} runs on it.
     */
    @Test
    void includeEmbeddingsQuantizesTheTable() throws Exception {
        Path streamed = tmp.resolve("q4e8");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "int4", "--group-size", "32",
                "--include-lm-head", "--include-embeddings", "--embedding-scheme", "int8", "--out", streamed.toString(),
                "--json"), lastOut[1]);
        JsonObject json = JsonParser.parseString(lastOut[0].trim()).getAsJsonObject();
        assertEquals(1, json.get("quantized_embeddings").getAsInt());
        JsonObject q = json.getAsJsonObject("quantization");
        assertTrue(!q.getAsJsonObject("skipped").has("model.embed_tokens"), q.toString());
        JsonObject row = null;
        for (var l : q.getAsJsonArray("layers")) {
            if (l.getAsJsonObject().get("path").getAsString().equals("model.embed_tokens")) {
                row = l.getAsJsonObject();
            }
        }
        assertEquals("embedding", row.get("kind").getAsString());
        assertEquals("int8", row.get("scheme").getAsString());
        ArtifactManifest manifest = QuantizedArtifact.verify(streamed);
        assertEquals(2, manifest.formatVersion());
        assertEquals(QuantScheme.INT8_WEIGHT_ONLY, manifest.embeddings().get("model.embed_tokens").scheme());
        assertEquals(QuantScheme.INT4_WEIGHT_ONLY, manifest.layers().get("lm_head").scheme());

        Path calib = tmp.resolve("calib.ids");
        Files.writeString(calib, "1 5 9 13 100 200 300 400 17 18 19 20\n2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n");
        Path gptq = tmp.resolve("q4gptq");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "int4", "--group-size", "32",
                "--method", "gptq", "--calibration", calib.toString(), "--include-embeddings", "--out",
                gptq.toString()), lastOut[1]);
        assertTrue(lastOut[0].contains("model.embed_tokens (embedding)"), lastOut[0]);
        assertTrue(lastOut[0].contains("no input activations for GPTQ"), lastOut[0]);
        assertEquals(32, QuantizedArtifact.verify(gptq).embeddings().get("model.embed_tokens").groupSize());

        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lib = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            Quantizer.quantize(lib, ai.djl.memopt.quantize.Int4WeightOnlyConfig.builder().optGroupSize(32)
                    .optIncludeLmHead(true).optIncludeEmbeddings(true)
                    .addOverride(ai.djl.memopt.quantize.LayerOverride.use("model.embed_tokens",
                            Int8WeightOnlyConfig.builder().build())).build());
            DeepSeekForCausalLM cli = QuantizedArtifact.loadDeepSeek(streamed, m, DataType.FLOAT32);
            var ids = m.create(new long[] {1, 5, 9, 100, 511, 7}, new Shape(1, 6));
            ParameterStore ps = new ParameterStore(m, false);
            assertArrayEquals(lib.forward(ps, new NDList(ids), false).head().toFloatArray(),
                    cli.forward(ps, new NDList(ids), false).head().toFloatArray());
        }
        // the cached decoder reads the model through the quantized table
        CliRun g = CliRun.run("generate", "--model", streamed.toString(), "--prompt-ids", "451,340,497", "--max-new-tokens",
                "5");
        assertEquals(0, g.exitCode, g.err);
        assertEquals(5, g.out.strip().split(" ").length, g.out);
    }

    @Test
    void badInputGivesClearErrors() {
        String model = V3.toString();
        String out = tmp.resolve("x").toString();
        assertNotEquals(0, run("quantize", "--model", model, "--scheme", "int3", "--out", out));
        assertTrue(lastOut[1].contains("--scheme must be int8, int4 or none, got 'int3'"), lastOut[1]);
        assertNotEquals(0, run("quantize", "--model", model, "--scheme", "int4", "--method", "hqq", "--out", out));
        assertTrue(lastOut[1].contains("unknown quantization method 'hqq'; known: rtn, awq, gptq"), lastOut[1]);
        assertNotEquals(0, run("quantize", "--model", model, "--scheme", "int4", "--method", "gptq", "--out", out));
        assertTrue(lastOut[1].contains("--method gptq needs --calibration"), lastOut[1]);
        assertNotEquals(0, run("quantize", "--model", model, "--scheme", "int4", "--method", "awq", "--out", out));
        assertTrue(lastOut[1].contains("--method awq needs --calibration"), lastOut[1]);
        assertNotEquals(0, run("quantize", "--model", model, "--scheme", "int4", "--group-size", "48", "--out", out));
        assertTrue(lastOut[1].contains("--group-size must be 32, 64 or 128, got 48"), lastOut[1]);
        assertEquals(1, run("quantize", "--model", tmp.resolve("nope").toString(), "--scheme", "int8", "--out", out));
        assertTrue(lastOut[1].contains("not a directory"), lastOut[1]);
        assertNotEquals(0, run("quantize", "--model", model, "--scheme", "int8", "--prune", "3:4", "--out", out));
        assertTrue(lastOut[1].contains("--prune must be '2:4' or a sparsity"), lastOut[1]);
        assertNotEquals(0, run("quantize", "--model", model, "--scheme", "int8", "--embedding-scheme", "int4",
                "--out", out));
        assertTrue(lastOut[1].contains("--embedding-scheme needs --include-embeddings"), lastOut[1]);
        assertNotEquals(0, run("quantize", "--model", model, "--scheme", "int8", "--include-embeddings",
                "--embedding-scheme", "fp8", "--out", out));
        assertTrue(lastOut[1].contains("--embedding-scheme must be int8 or int4, got 'fp8'"), lastOut[1]);
        assertNotEquals(0, run("quantize", "--model", model, "--scheme", "none", "--prune", "2:4",
                "--include-embeddings", "--out", out));
        assertTrue(lastOut[1].contains("--include-embeddings needs --scheme int8 or int4"), lastOut[1]);
        assertTrue(!Files.exists(tmp.resolve("x").resolve("quantization.json")));
    }

    @Test
    void refusesToWriteOverTheSourceModel() throws Exception {
        Path copy = tmp.resolve("model-copy");
        Files.createDirectories(copy);
        for (String f : new String[] {"config.json", "model.safetensors"}) {
            Files.copy(V3.resolve(f), copy.resolve(f));
        }
        String sha = QuantizedArtifact.sha256(copy.resolve("model.safetensors"));
        assertEquals(1, run("quantize", "--model", copy.toString(), "--scheme", "int8", "--out", copy.toString()));
        assertTrue(lastOut[1].contains("refusing to overwrite"), lastOut[1]);
        assertEquals(sha, QuantizedArtifact.sha256(copy.resolve("model.safetensors")));
    }

    @Test
    void calibrationIdsOutsideTheVocabularyAreRejected() throws Exception {
        Path calib = tmp.resolve("bad.ids");
        Files.writeString(calib, "1 2 3\n4 99999 5\n");
        assertEquals(1, run("quantize", "--model", V3.toString(), "--scheme", "int8", "--method", "awq",
                "--calibration", calib.toString(), "--out", tmp.resolve("y").toString()));
        assertTrue(lastOut[1].contains("line 2: token id 99999 outside the model's vocabulary [0, 512)"), lastOut[1]);
    }

    @Test
    void anArtifactIsRefusedInOneLineAndAMissingManifestIsNamed() throws Exception {
        Path art = tmp.resolve("q4");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "int4", "--group-size", "64", "--out",
                art.toString()), lastOut[1]);
        assertEquals(1, run("quantize", "--model", art.toString(), "--scheme", "int8", "--out",
                tmp.resolve("again").toString()));
        String err = lastOut[1].trim().lines().findFirst().orElse(""); // then the CLI's one "Try ..." line at most
        assertTrue(err.contains("already quantized (int4 g64)") && err.contains("quantize the original model instead"),
                err);
        assertTrue(err.length() < 300 && lastOut[1].trim().lines().count() <= 2, err.length() + " characters: "
                + lastOut[1]);

        Files.delete(art.resolve("quantization.json"));
        assertEquals(1, run("quantize", "--model", art.toString(), "--scheme", "int8", "--out",
                tmp.resolve("again").toString()));
        assertTrue(lastOut[1].contains("quantization.json is missing") && !lastOut[1].contains("unexpected tensor"),
                lastOut[1]);
        assertTrue(lastOut[1].trim().length() < 400, lastOut[1]);
    }

    @Test
    void reQuantizingReplacesTheArtifactAndCleansWhatAKillLeft() throws Exception {
        Path out = tmp.resolve("out").resolve("q");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "int8", "--out", out.toString()),
                lastOut[1]);
        // what a kill during an earlier run leaves: a partial sibling and a temporary file of the older writer
        Files.createDirectories(out.getParent().resolve(".q.tmp-4242")).resolve("model.safetensors").toFile()
                .createNewFile();
        Files.writeString(out.resolve(".model.safetensors.777.tmp"), "half");
        assertEquals(0, run("quantize", "--model", V3.toString(), "--scheme", "int4", "--out", out.toString()),
                lastOut[1]);
        assertEquals(QuantScheme.INT4_WEIGHT_ONLY,
                QuantizedArtifact.verify(out).layers().get("model.layers.0.self_attn.o_proj").scheme());
        try (var s = Files.list(out.getParent())) {
            assertEquals(java.util.List.of("q"), s.map(p -> p.getFileName().toString()).toList());
        }
        assertTrue(!Files.exists(out.resolve(".model.safetensors.777.tmp")));
    }
}
