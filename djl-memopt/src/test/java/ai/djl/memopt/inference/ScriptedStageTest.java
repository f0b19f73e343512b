package ai.djl.memopt.inference;

import static ai.djl.memopt.inference.MlaCachedDecoderTest.fixture;
import static ai.djl.memopt.inference.MlaCachedDecoderTest.stepDifferences;
import static ai.djl.memopt.inference.MlaCachedDecoderTest.longs;
import static ai.djl.memopt.inference.MlaCachedDecoderTest.nativeResident;
import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.core.Linear;
import java.io.IOException;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.junit.jupiter.api.extension.ExtendWith;

@ExtendWith(OneThread.class)
class ScriptedStageTest {

    @ParameterizedTest
    @ValueSource(strings = {"tiny-deepseek-v3", "tiny-deepseek-v2"})
    void scriptedStepEqualsTheJavaPath(String name) throws IOException {
        Path dir = fixture(name);
        long[][] prompts = {{451, 340, 497, 361}, {-1, -1, 200, 7}};
        long[][] next = {{7, 300, 12, 99, 5, 8}, {41, 3, 250, 18, 77, 6}};
        for (ExpertDispatch experts : List.of(ExpertDispatch.GATHERED, ExpertDispatch.SORTED)) {
            try (TestModel a = TestModel.load(dir, DataType.FLOAT32);
                    TestModel b = TestModel.load(dir, DataType.FLOAT32)) {
                MlaCachedDecoder scripted = new MlaCachedDecoder(a.model(), Device.cpu(), experts, DecodePath.AUTO);
                MlaCachedDecoder java = new MlaCachedDecoder(b.model(), Device.cpu(), experts, DecodePath.JAVA);
                assertEquals(DecodePath.TORCHSCRIPT, scripted.decodePath(), scripted.javaPathReason());
                assertEquals(DecodePath.JAVA, java.decodePath());
                List<Float> diffs = stepDifferences(scripted, java, prompts, next);
                System.out.println(name + " " + experts + " scripted vs Java: " + diffs);
                for (float d : diffs) {
                    assertTrue(d < 1e-5f, name + " " + experts + " scripted vs Java: " + diffs);
                }
            }
        }
    }

    @ParameterizedTest
    @ValueSource(strings = {"tiny-deepseek-v3", "tiny-deepseek-v2"})
    void scriptedGreedyReproducesTransformers(String name) throws IOException {
        Path dir = fixture(name);
        long[] prompt = longs(dir, "greedy_prompt");
        long[] full = longs(dir, "greedy_output");
        long[] expected = Arrays.copyOfRange(full, prompt.length, full.length);
        SamplingParams params = SamplingParams.builder().setMaxNewTokens(expected.length)
                .optEosTokenIds(TextTokenizer.readEosIds(dir)).build();
        try (TestModel loaded = TestModel.load(dir, DataType.FLOAT32)) {
            for (ExpertDispatch experts : List.of(ExpertDispatch.GATHERED, ExpertDispatch.SORTED)) {
                MlaCachedDecoder lm = new MlaCachedDecoder(loaded.model(), Device.cpu(), experts, DecodePath.TORCHSCRIPT);
                assertEquals(DecodePath.TORCHSCRIPT, lm.decodePath());
                assertArrayEquals(expected, new Generator(lm, null).generate(prompt, params).outputIds(), experts.toString());
                // and with the prompt fed in chunks (prefill at an offset of the cache)
                assertArrayEquals(expected, new Generator(lm, null).withPrefillChunk(3).generate(prompt, params).outputIds());
            }
        }
    }

    @ParameterizedTest
    @ValueSource(strings = {"tiny-deepseek-v3", "tiny-deepseek-v2"})
    void foldedStepEqualsTheJavaPathOnEverySplit(String name) throws IOException {
        // the first stage's call embeds the ids, the last one's ends with the norm and head, any between does neither
        Path dir = fixture(name);
        long[][] prompts = {{451, 340, 497, 361}, {-1, -1, 200, 7}};
        long[][] next = {{7, 300, 12, 99, 5, 8}, {41, 3, 250, 18, 77, 6}};
        try (TestModel a = TestModel.load(dir, DataType.FLOAT32);
                TestModel b = TestModel.load(dir, DataType.FLOAT32)) {
            MlaCachedDecoder java = new MlaCachedDecoder(b.model(), Device.cpu(), ExpertDispatch.SORTED, DecodePath.JAVA);
            int layers = a.config().numHiddenLayers();
            for (String split : List.of(Integer.toString(layers), "1," + (layers - 1), "1,1," + (layers - 2))) {
                int n = split.split(",").length;
                StagePlan plan = StagePlan.parse(LayerSplitTest.cpus(n), split, layers);
                MlaCachedDecoder scripted = new MlaCachedDecoder(a.model(), plan, ExpertDispatch.SORTED, DecodePath.AUTO);
                for (int s = 0; s < n; s++) {
                    assertEquals(new ScriptedStepSource.Ends(s == 0, s == n - 1, false), scripted.stage(s).scriptEnds(),
                            split + ", stage " + s);
                }
                List<Float> diffs = stepDifferences(scripted, java, prompts, next);
                for (float d : diffs) {
                    assertEquals(0f, d, name + " split " + split + " folded vs Java: " + diffs);
                }
            }
        }
    }

    @Test
    void tiedHeadFoldsAndADecoratedHeadStaysInJava() throws IOException {
        long[][] prompts = {{451, 340, 497}, {-1, 5, 17}};
        long[][] next = {{7, 300, 12, 99}, {41, 3, 250, 18}};
        DeepSeekConfig tied = DeepSeekConfig.fromJson(fixture("tiny-deepseek-v3").resolve("config.json")).toBuilder()
                .numHiddenLayers(2).tieWordEmbeddings(true).build();
        try (NDManager weights = NDManager.newBaseManager()) {
            DeepSeekForCausalLM model = DeepSeekForCausalLM.random(tied, 11, weights, DataType.FLOAT32);
            MlaCachedDecoder scripted = new MlaCachedDecoder(model, Device.cpu(), ExpertDispatch.SORTED, DecodePath.AUTO);
            assertEquals(new ScriptedStepSource.Ends(true, true, true), scripted.stage(0).scriptEnds());
            MlaCachedDecoder java = new MlaCachedDecoder(model, Device.cpu(), ExpertDispatch.SORTED, DecodePath.JAVA);
            for (float d : stepDifferences(scripted, java, prompts, next)) {
                assertEquals(0f, d, "tied head, folded vs Java");
            }
        }
        Path dir = fixture("tiny-deepseek-v3");
        try (TestModel a = TestModel.load(dir, DataType.FLOAT32);
                TestModel b = TestModel.load(dir, DataType.FLOAT32)) {
            for (TestModel m : List.of(a, b)) {
                BlockTrees.replace(m.model(), "lm_head", x -> new RoundedLinear((Linear) x));
            }
            MlaCachedDecoder scripted = new MlaCachedDecoder(a.model(), Device.cpu(), ExpertDispatch.SORTED, DecodePath.AUTO);
            assertEquals(DecodePath.TORCHSCRIPT, scripted.decodePath(), "the layers still qualify");
            assertEquals(new ScriptedStepSource.Ends(true, false, false), scripted.stage(0).scriptEnds());
            MlaCachedDecoder java = new MlaCachedDecoder(b.model(), Device.cpu(), ExpertDispatch.SORTED, DecodePath.JAVA);
            for (float d : stepDifferences(scripted, java, prompts, next)) {
                assertEquals(0f, d, "decorated lm_head in Java after the scripted layers");
            }
        }
    }

    @Test
    void fp16ScriptedStepEqualsTheFp16JavaPath() throws IOException {
        Path dir = fixture("tiny-deepseek-v3");
        long[][] prompts = {{451, 340, 497, 361, 133, 474}, {-1, -1, -1, 5, 17, 300}};
        long[][] next = {{198, 191, 59, 261, 76, 152}, {7, 300, 12, 99, 5, 8}};
        try (TestModel a = TestModel.load(dir, DataType.FLOAT16);
                TestModel b = TestModel.load(dir, DataType.FLOAT16)) {
            MlaCachedDecoder scripted = new MlaCachedDecoder(a.model(), Device.cpu(), ExpertDispatch.GATHERED);
            assertEquals(DecodePath.TORCHSCRIPT, scripted.decodePath(), scripted.javaPathReason());
            MlaCachedDecoder java = new MlaCachedDecoder(b.model(), Device.cpu(), ExpertDispatch.GATHERED, DecodePath.JAVA);
            List<Float> diffs = stepDifferences(scripted, java, prompts, next);
            for (float d : diffs) {
                assertTrue(d < 5e-3f, "fp16 scripted vs Java: " + diffs);
            }
            List<Float> recomputed = stepDifferences(scripted, LanguageModels.recomputing(b.model()), prompts, next);
            for (float d : recomputed) {
                assertTrue(d < 5e-3f, "fp16 scripted vs recomputed: " + recomputed);
            }
        }
    }

    @Test
    void paddedBatchGeneratesTheJavaPathsTokens() throws IOException {
        Path dir = fixture("tiny-deepseek-v2");
        List<long[]> prompts = List.of(new long[] {451, 340, 497, 361, 133, 474}, new long[] {5, 17}, new long[] {300, 2, 44, 9});
        SamplingParams params = SamplingParams.builder().setMaxNewTokens(10).optIgnoreEos(true).build();
        try (TestModel a = TestModel.load(dir, DataType.FLOAT32);
                TestModel b = TestModel.load(dir, DataType.FLOAT32);
                NDManager m = NDManager.newBaseManager()) {
            Generator scripted = new Generator(new MlaCachedDecoder(a.model(), Device.cpu(), ExpertDispatch.SORTED,
                    DecodePath.TORCHSCRIPT), null);
            Generator java = new Generator(new MlaCachedDecoder(b.model(), Device.cpu(), ExpertDispatch.SORTED,
                    DecodePath.JAVA), null);
            List<GenerationResult> s = scripted.generate(m, prompts, params, null, () -> false);
            List<GenerationResult> j = java.generate(m, prompts, params, null, () -> false);
            for (int i = 0; i < prompts.size(); i++) {
                assertArrayEquals(j.get(i).outputIds(), s.get(i).outputIds(), "row " + i);
                assertArrayEquals(scripted.generate(prompts.get(i), params).outputIds(), s.get(i).outputIds(), "row " + i + " alone");
            }
        }
    }

    @Test
    void decoratedOrQuantizedModelsTakeTheJavaPath() throws IOException {
        Path dir = fixture("tiny-deepseek-v3");
        try (TestModel rounded = TestModel.load(dir, DataType.FLOAT32);
                TestModel quantized = TestModel.load(dir, DataType.FLOAT32)) {
            BlockTrees.replace(rounded.model(), "model.layers.1.self_attn.kv_b_proj", b -> new RoundedLinear((Linear) b));
            MlaCachedDecoder auto = new MlaCachedDecoder(rounded.model(), Device.cpu());
            assertEquals(DecodePath.JAVA, auto.decodePath());
            assertTrue(auto.javaPathReason().contains("model.layers.1.self_attn.kv_b_proj"), auto.javaPathReason());
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> new MlaCachedDecoder(rounded.model(), Device.cpu(), ExpertDispatch.AUTO, DecodePath.TORCHSCRIPT));
            assertTrue(e.getMessage().contains("RoundedLinear"), e.getMessage());

            ai.djl.memopt.quantize.Quantizer.quantize(quantized.model(),
                    ai.djl.memopt.quantize.Int8WeightOnlyConfig.builder().build());
            MlaCachedDecoder q = new MlaCachedDecoder(quantized.model(), Device.cpu());
            assertEquals(DecodePath.JAVA, q.decodePath());
            assertTrue(q.javaPathReason().startsWith("model.layers.0."), q.javaPathReason());
            // and the Java path still decodes it like its recomputation
            for (float d : stepDifferences(q, LanguageModels.recomputing(quantized.model()), new long[][] {{451, 340, 497}},
                    new long[][] {{7, 300, 12}})) {
                assertTrue(d < 1e-4f, "int8 through the fallback: " + d);
            }
        }
    }

    @Test
    void systemPropertyForcesTheJavaPath() throws IOException {
        try (TestModel loaded = TestModel.load(fixture("tiny-deepseek-v3"), DataType.FLOAT32)) {
            System.setProperty(DecodePath.PROPERTY, "java");
            try {
                MlaCachedDecoder lm = new MlaCachedDecoder(loaded.model(), Device.cpu());
                assertEquals(DecodePath.JAVA, lm.decodePath());
                assertTrue(lm.javaPathReason().contains(DecodePath.PROPERTY), lm.javaPathReason());
                System.setProperty(DecodePath.PROPERTY, "fast");
                assertThrows(IllegalArgumentException.class, () -> new MlaCachedDecoder(loaded.model(), Device.cpu()));
            } finally {
                System.clearProperty(DecodePath.PROPERTY);
            }
            MlaCachedDecoder lm = new MlaCachedDecoder(loaded.model(), Device.cpu());
            assertEquals(DecodePath.TORCHSCRIPT, lm.decodePath());
            assertNull(lm.javaPathReason());
        }
    }

    @Test
    void scriptedMoeDecodeKeepsMemoryFlat() throws IOException {
        // the fixture's shapes with two layers (the second is MoE), random weights; 600 gathered scripted steps
        DeepSeekConfig config = DeepSeekConfig.fromJson(fixture("tiny-deepseek-v3").resolve("config.json")).toBuilder()
                .numHiddenLayers(2).maxPositionEmbeddings(2048).build();
        try (NDManager weights = NDManager.newBaseManager();
                NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM model = DeepSeekForCausalLM.random(config, 7, weights, DataType.FLOAT32);
            MlaCachedDecoder lm = new MlaCachedDecoder(model, Device.cpu(), ExpertDispatch.GATHERED);
            assertEquals(DecodePath.TORCHSCRIPT, lm.decodePath(), lm.javaPathReason());
            Generator g = new Generator(lm, null);
            int n = 600;
            SamplingParams params = SamplingParams.builder().setMaxNewTokens(n).optIgnoreEos(true).build();
            int modelArrays = weights.getManagedArrays().size();
            g.generate(m, List.of(new long[] {451, 340, 497}), params, null, () -> false); // warm-up
            int[] arrays = new int[n];
            long[] rss = new long[n];
            int[] k = new int[1];
            boolean smaps = NativeRss.available();
            GenerationResult r = g.generate(m, List.of(new long[] {451, 340, 497}), params, (i, id, d) -> {
                arrays[k[0]] = m.getManagedArrays().size();
                rss[k[0]++] = k[0] % 100 == 0 ? nativeResident(smaps) : 0;
            }, () -> false).get(0);
            assertEquals(n, r.outputIds().length);
            for (int s = 1; s < n; s++) {
                assertEquals(arrays[0], arrays[s], "arrays alive after step " + s);
            }
            assertEquals(modelArrays, weights.getManagedArrays().size(), "nothing left in the model's manager");
            assertEquals(0, m.getManagedArrays().size(), "the session is closed");
            long growth = rss[n - 1] - rss[99];
            System.out.printf("scripted, %d steps: native RSS %+d KiB from step 100%n", n, growth >> 10);
            // a leaked (1, S, 24) cache copy or a step's tensors per token would pass this by far
            assertTrue(growth < 32L << 20, "native RSS grew by " + (growth >> 10) + " KiB between steps 100 and " + n);
        }
    }
}
