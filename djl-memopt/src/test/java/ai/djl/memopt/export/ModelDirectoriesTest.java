package ai.djl.memopt.export;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.inference.GenerationModel;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class ModelDirectoriesTest {

    static final Path V3 = Path.of("src/test/resources/fixtures/tiny-deepseek-v3");

    @TempDir Path tmp;

    static float[] logits(DeepSeekForCausalLM lm, NDManager m) {
        NDArray ids = m.create(new long[] {3, 14, 15, 92, 65, 35}, new Shape(1, 6));
        return lm.forward(new ParameterStore(m, false), new NDList(ids), false).head().toFloatArray();
    }

    @Test
    void opensCheckpointsAndArtifactsAlikeAndArtifactsCarryTheTokenizer() throws IOException {
        Path source = Files.createDirectories(tmp.resolve("model"));
        for (String f : new String[] {"config.json", "model.safetensors", "generation_config.json"}) {
            Files.copy(V3.resolve(f), source.resolve(f), StandardCopyOption.REPLACE_EXISTING);
        }
        Files.writeString(source.resolve("tokenizer.json"), "{\"stand-in\": true}");
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM plain = ModelDirectories.loadDeepSeek(source, m, DataType.FLOAT32);
            assertFalse(ModelDirectories.isQuantizedArtifact(source));
            float[] fp32 = logits(plain, m);
            assertArrayEquals(logits(DeepSeekLoader.load(V3, m, DataType.FLOAT32), m), fp32);

            Quantizer.quantize(plain, Int8WeightOnlyConfig.builder().build());
            float[] quantized = logits(plain, m);
            Path artifact = tmp.resolve("int8");
            QuantizedArtifact.export(plain, artifact, ExportOptions.builder().optSourceModel(source).build());
            assertTrue(ModelDirectories.isQuantizedArtifact(artifact));
            assertEquals("{\"stand-in\": true}", Files.readString(artifact.resolve("tokenizer.json")));
            assertTrue(Files.isRegularFile(artifact.resolve("generation_config.json")));
            assertTrue(QuantizedArtifact.verify(artifact).files().containsKey("tokenizer.json"),
                    "companions are checksummed like the weights");

            DeepSeekForCausalLM loaded = ModelDirectories.loadDeepSeek(artifact, m, DataType.FLOAT32);
            assertInstanceOf(QuantizedLinear.class, Blocks.get(loaded, "model.layers.0.self_attn.o_proj"));
            assertArrayEquals(quantized, logits(loaded, m));

            Files.writeString(artifact.resolve("tokenizer.json"), "{\"tampered\": true}");
            QuantizedArtifactException e = assertThrows(QuantizedArtifactException.class,
                    () -> ModelDirectories.loadDeepSeek(artifact, m, DataType.FLOAT32));
            assertTrue(e.getMessage().contains("tokenizer.json"), e.getMessage());
        }
        IOException e = assertThrows(IOException.class,
                () -> ModelDirectories.loadDeepSeek(tmp.resolve("absent"), (NDManager) null, DataType.FLOAT32));
        assertTrue(e.getMessage().contains("absent"), e.getMessage());
    }

    /**
     * An int8 artifact of the V3 fixture, exported from a source directory that also holds {@code tokenizerFiles} of
     * the word-level tokenizer and, if not null, a {@code chat_template.jinja}.
     */
    private Path artifact(String name, String chatTemplate, String... tokenizerFiles) throws IOException {
        Path source = Files.createDirectories(tmp.resolve(name + "-source"));
        for (String f : new String[] {"config.json", "model.safetensors", "generation_config.json"}) {
            Files.copy(V3.resolve(f), source.resolve(f));
        }
        for (String f : tokenizerFiles) {
            Files.copy(TOKENIZER.resolve(f), source.resolve(f));
        }
        if (chatTemplate != null) {
            Files.writeString(source.resolve("chat_template.jinja"), chatTemplate);
        }
        Path artifact = tmp.resolve(name);
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(source, m, DataType.FLOAT32);
            Quantizer.quantize(lm, Int8WeightOnlyConfig.builder().build());
            QuantizedArtifact.export(lm, artifact, ExportOptions.builder().optSourceModel(source).build());
        }
        return artifact;
    }

    static final Path TOKENIZER = Path.of("src/test/resources/tokenizers/wordlevel-512");

    @Test
    void anArtifactIsUsedOnlyWithTheTokenizerFilesItsManifestLists() throws IOException {
        Path with = artifact("with", null, "tokenizer.json", "tokenizer_config.json");
        assertEquals(java.util.Set.of("tokenizer.json", "tokenizer_config.json", "generation_config.json"),
                ModelDirectories.tokenizerFiles(with));
        try (GenerationModel g = GenerationModel.open(with, Device.cpu(), DataType.FLOAT32)) {
            assertTrue(g.tokenizer().isPresent(), "a listed tokenizer is used");
        }

        Path without = artifact("without", null);
        assertEquals(java.util.Set.of("generation_config.json"), ModelDirectories.tokenizerFiles(without));
        Files.copy(TOKENIZER.resolve("tokenizer.json"), without.resolve("tokenizer.json"));
        IOException e = assertThrows(IOException.class, () -> ModelDirectories.tokenizerFiles(without));
        assertTrue(e.getMessage().contains("tokenizer.json") && e.getMessage().contains("not listed"), e.getMessage());
        IOException g = assertThrows(IOException.class,
                () -> GenerationModel.open(without, Device.cpu(), DataType.FLOAT32).close());
        assertTrue(g.getMessage().contains("tokenizer.json") && g.getMessage().contains("not listed"), g.getMessage());

        // a listed tokenizer.json does not make an unlisted tokenizer_config.json beside it usable
        Path half = artifact("half", null, "tokenizer.json");
        Files.copy(TOKENIZER.resolve("tokenizer_config.json"), half.resolve("tokenizer_config.json"));
        IOException h = assertThrows(IOException.class,
                () -> GenerationModel.open(half, Device.cpu(), DataType.FLOAT32).close());
        assertTrue(h.getMessage().contains("tokenizer_config.json") && h.getMessage().contains("not listed"),
                h.getMessage());

        // a chat template beside the source's tokenizer travels with it, listed and checksummed
        Path chat = artifact("chat", "{{ messages[0]['content'] }}");
        assertEquals(java.util.Set.of("chat_template.jinja", "generation_config.json"),
                ModelDirectories.tokenizerFiles(chat));
        assertTrue(QuantizedArtifact.verify(chat).files().containsKey("chat_template.jinja"));

        // a checkpoint directory has no manifest: whatever it holds is its own
        Path plain = Files.createDirectories(tmp.resolve("plain"));
        Files.copy(TOKENIZER.resolve("tokenizer.json"), plain.resolve("tokenizer.json"));
        assertEquals(java.util.Set.of("tokenizer.json"), ModelDirectories.tokenizerFiles(plain));
    }
}
