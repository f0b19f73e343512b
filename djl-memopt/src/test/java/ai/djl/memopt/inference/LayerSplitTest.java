package ai.djl.memopt.inference;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.gguf.GgmlType;
import ai.djl.memopt.gguf.GgufExporter;
import ai.djl.memopt.gguf.GgufQuantizer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.model.deepseek.LayerPlacement;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Parameter;
import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/**
 * Layer-split generation on one device: stages on the CPU run the same code as stages on several GPUs (the weights of
 * each stage on its own manager, the cache per stage, the hidden state copied between stages), so their tokens and
 * logits must be exactly the single-device ones, for float checkpoints, int8/int4 artifacts and GGUF files.
 */
@ExtendWith(OneThread.class)
class LayerSplitTest {

    private static final Path V3 = MlaCachedDecoderTest.fixture("tiny-deepseek-v3");

    @TempDir
    Path tmp;

    static List<Device> cpus(int n) {
        return Collections.nCopies(n, Device.cpu());
    }

    private static long[] greedy(GenerationModel m, long[] prompt, int tokens) {
        SamplingParams params = SamplingParams.builder().setMaxNewTokens(tokens).optIgnoreEos(true).build();
        return m.generator().generate(prompt, params).outputIds();
    }

    /** The prefill logits of {@code prompt}, and the session's hops. */
    private static float[] prefill(GenerationModel m, long[] prompt, List<MlaCachedDecoder.Hops> hops) {
        try (NDManager manager = NDManager.newBaseManager(m.decoder().device());
                MlaCachedDecoder.Session s = m.decoder().newSession(manager, 1, prompt.length + 1)) {
            long[] positions = new long[prompt.length];
            long[] mask = new long[prompt.length];
            for (int i = 0; i < prompt.length; i++) {
                positions[i] = i;
                mask[i] = 1;
            }
            Shape shape = new Shape(1, prompt.length);
            float[] logits = s.next(manager.create(prompt, shape), manager.create(positions, shape),
                    manager.create(mask, shape)).toFloatArray();
            hops.add(s.hops());
            return logits;
        }
    }

    /** Whether {@code array} was allocated on {@code owner} or a sub-manager of it. */
    private static boolean ownedBy(NDArray array, NDManager owner) {
        for (NDManager m = array.getManager(); m != null; m = m.getParentManager()) {
            if (m == owner) {
                return true;
            }
            if (m == m.getParentManager()) {
                break;
            }
        }
        return false;
    }

    @ParameterizedTest
    @ValueSource(strings = {"tiny-deepseek-v3", "tiny-deepseek-v2"})
    void stagesOnOneDeviceGiveTheSingleDeviceTokensAndLogits(String name) throws IOException {
        Path dir = MlaCachedDecoderTest.fixture(name);
        long[] prompt = MlaCachedDecoderTest.longs(dir, "greedy_prompt");
        long[] full = MlaCachedDecoderTest.longs(dir, "greedy_output");
        long[] transformers = Arrays.copyOfRange(full, prompt.length, full.length);
        try (GenerationModel single = GenerationModel.open(dir, Device.cpu(), DataType.FLOAT32)) {
            long[] expected = greedy(single, prompt, transformers.length);
            assertArrayEquals(transformers, expected, "the single-device reference");
            List<MlaCachedDecoder.Hops> hops = new ArrayList<>();
            float[] logits = prefill(single, prompt, hops);
            for (String split : List.of("2,1", "0-0,1-2", "1,1,1")) {
                int stages = split.split(",").length;
                StagePlan plan = StagePlan.choose(dir, cpus(stages), DataType.FLOAT32, split);
                try (GenerationModel m = GenerationModel.open(dir, plan, DataType.FLOAT32, null)) {
                    assertArrayEquals(expected, greedy(m, prompt, expected.length), split);
                    assertArrayEquals(logits, prefill(m, prompt, hops), split + ": bit for bit");
                    MlaCachedDecoder.Hops h = hops.get(hops.size() - 1);
                    // one hidden state (1, T, hidden) FP32 per stage boundary
                    assertEquals(stages - 1, h.count(), split);
                    assertEquals((stages - 1L) * prompt.length * m.config().hiddenSize() * 4, h.bytes(), split);
                    assertWeightsFollowThePlacement(m.model(), plan);
                    assertEquals(stages, m.decoder().cacheBytesPerTokenByStage().length);
                    assertEquals(single.decoder().cacheBytesPerToken(), m.decoder().cacheBytesPerToken());
                }
            }
        }
    }

    /** Every decoder layer's parameters sit on its stage's manager, the embeddings on the first, the head on the last. */
    private static void assertWeightsFollowThePlacement(DeepSeekForCausalLM lm, StagePlan plan) {
        LayerPlacement placement = lm.placement().orElseThrow();
        assertEquals(plan.stages().size(), placement.stages());
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(lm).entrySet()) {
            int stage = placement.stageOf(e.getKey(), lm.config().tieWordEmbeddings());
            if (e.getKey().startsWith("model.layers.")) {
                int layer = Integer.parseInt(e.getKey().split("\\.")[2]);
                assertEquals(plan.stageOfLayer(layer), stage, e.getKey());
            }
            assertTrue(ownedBy(e.getValue().getArray(), placement.manager(stage)), e.getKey() + " on stage " + stage);
        }
    }

    @ParameterizedTest
    @ValueSource(strings = {"int8", "int4"})
    void quantizedArtifactsSplitGiveTheSingleDeviceTokens(String scheme) throws IOException {
        QuantizationConfig config = scheme.equals("int8") ? Int8WeightOnlyConfig.builder().build()
                : Int4WeightOnlyConfig.builder().optGroupSize(32).build();
        Path dir = tmp.resolve(scheme);
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            Quantizer.quantize(lm, config);
            QuantizedArtifact.export(lm, dir, ExportOptions.builder().optSourceModel(V3).build());
        }
        assertSplitMatchesSingle(dir, "1,2");
    }

    @Test
    void ggufQ40SplitGivesTheSingleDeviceTokens() throws Exception {
        Path file = tmp.resolve("v3-q4_0.gguf");
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            GgufQuantizer.quantize(lm, GgmlType.Q4_0);
            GgufExporter.export(lm, V3, GgmlType.Q4_0, file, null);
        }
        assertSplitMatchesSingle(file, "2,1");
    }

    private static void assertSplitMatchesSingle(Path model, String split) throws IOException {
        long[] prompt = {3, 14, 15, 92, 65};
        StagePlan plan = StagePlan.choose(model, cpus(2), DataType.FLOAT32, split);
        try (GenerationModel single = GenerationModel.open(model, Device.cpu(), DataType.FLOAT32);
                GenerationModel m = GenerationModel.open(model, plan, DataType.FLOAT32, null)) {
            List<MlaCachedDecoder.Hops> hops = new ArrayList<>();
            assertArrayEquals(prefill(single, prompt, hops), prefill(m, prompt, hops), model + ": prefill logits");
            assertArrayEquals(greedy(single, prompt, 12), greedy(m, prompt, 12), model.toString());
            // the quantized tensors of the last layer were read onto the second stage's manager
            LayerPlacement placement = m.model().placement().orElseThrow();
            QuantizedLinear q = (QuantizedLinear) BlockTrees.get(m.model(), "model.layers.2.mlp.experts.0.up_proj");
            assertTrue(ownedBy(q.quantizedWeight().data(), placement.manager(1)), "layer 2's codes on stage 1");
            QuantizedLinear first = (QuantizedLinear) BlockTrees.get(m.model(), "model.layers.0.self_attn.o_proj");
            assertTrue(ownedBy(first.quantizedWeight().data(), placement.manager(0)), "layer 0's codes on stage 0");
        }
    }

    @Test
    void loraAdapterOnASplitModelDecodesLikeOnOneDevice() throws IOException {
        Path adapter = Path.of("src/test/resources/fixtures/tiny-deepseek-v3-lora");
        long[] prompt = {3, 14, 15, 92, 65};
        StagePlan plan = StagePlan.choose(V3, cpus(3), DataType.FLOAT32, "1,1,1");
        try (GenerationModel single = GenerationModel.open(V3, Device.cpu(), DataType.FLOAT32, adapter);
                GenerationModel m = GenerationModel.open(V3, plan, DataType.FLOAT32, adapter)) {
            assertArrayEquals(greedy(single, prompt, 10), greedy(m, prompt, 10));
        }
    }

    @Test
    void handSplitsAreCheckedAndNamed() {
        List<Device> two = cpus(2);
        assertEquals("0-1,2-2", StagePlan.parse(two, "2,1", 3).describe());
        assertEquals("0-0,1-2", StagePlan.parse(two, "0,1-2", 3).describe());
        assertMessage("places 4 layers; the model has 3 decoder layers", () -> StagePlan.parse(two, "2,2", 3));
        assertMessage("places 2 layers; the model has 3", () -> StagePlan.parse(two, "1,1", 3));
        assertMessage("every device needs at least one", () -> StagePlan.parse(two, "3,0", 3));
        assertMessage("4 devices need at least as many decoder layers, the model has 3",
                () -> StagePlan.parse(cpus(4), "1,1,1,0", 3));
        assertMessage("has 3 entries for 2 devices", () -> StagePlan.parse(two, "1,1,1", 3));
        assertMessage("entry 1 'x' is not a layer count", () -> StagePlan.parse(two, "x,1", 3));
        assertMessage("range 2 '2-3' goes past the last layer, 2", () -> StagePlan.parse(two, "0-1,2-3", 3));
        assertMessage("must start at layer 2", () -> StagePlan.parse(two, "0-1,1-2", 3));
        assertMessage("5 devices need at least as many decoder layers, the model has 3",
                () -> StagePlan.choose(V3, cpus(5), DataType.FLOAT32, null));
    }

    @Test
    void memorySplitsFollowEachDevicesRoom() {
        List<Device> two = cpus(2);
        long[] layers = {100, 100, 100, 100};
        assertEquals("0-1,2-3", StagePlan.byMemory(two, layers, 0, 0, new long[] {1000, 1000}).describe());
        assertEquals("0-2,3-3", StagePlan.byMemory(two, layers, 0, 0, new long[] {3000, 1000}).describe());
        // the embedding weighs on the first stage, the head on the last
        assertEquals("0-0,1-3", StagePlan.byMemory(two, layers, 250, 0, new long[] {1000, 1000}).describe());
        assertEquals("0-2,3-3", StagePlan.byMemory(two, layers, 0, 250, new long[] {1000, 1000}).describe());
        assertMessage("the weights do not fit the devices' free memory: the best split (0-1,2-3) needs",
                () -> StagePlan.byMemory(two, layers, 0, 0, new long[] {150, 150}));
        assertMessage("no room for weights on cpu()", () -> StagePlan.byMemory(two, layers, 0, 0,
                new long[] {0, 1000}));
        // an equal split of the fixture by the CPU's free memory
        try {
            assertEquals(3, StagePlan.choose(V3, cpus(3), DataType.FLOAT32, null).stages().size());
            assertSame(Device.cpu(), StagePlan.choose(V3, cpus(1), DataType.FLOAT32, null).devices().get(0));
        } catch (IOException e) {
            throw new AssertionError(e);
        }
    }

    private static void assertMessage(String expected, org.junit.jupiter.api.function.Executable call) {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, call);
        assertTrue(e.getMessage().contains(expected), e.getMessage());
    }
}
