package ai.djl.memopt.examples.guide;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.Model;
import ai.djl.engine.Engine;
import ai.djl.memopt.examples.wrap.UserModels;
import ai.djl.memopt.examples.wrap.WrapUserModelExample;
import ai.djl.memopt.inference.GenerationModel;
import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.memopt.lora.LoraReport;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.training.DefaultTrainingConfig;
import ai.djl.training.ParameterStore;
import ai.djl.training.dataset.ArrayDataset;
import ai.djl.training.dataset.Batch;
import ai.djl.training.loss.Loss;
import ai.djl.training.optimizer.Optimizer;
import ai.djl.training.tracker.Tracker;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Every snippet of the user guide runs, at toy size, and does what the guide says it does. */
class GuideSnippetsTest {

    static final Path FIXTURES = Path.of("..", "djl-memopt", "src", "test", "resources", "fixtures").toAbsolutePath()
            .normalize();
    static final Path V3 = FIXTURES.resolve("tiny-deepseek-v3");
    static final Path TOKENIZER = Path.of("..", "djl-memopt", "src", "test", "resources", "tokenizers",
            "wordlevel-512").toAbsolutePath().normalize();
    static final Shape IMAGES = new Shape(8, 3, 4, 4);

    @TempDir Path tmp;

    private static SequentialBlock mlp() {
        return UserModels.mlp(3 * 4 * 4, 10, 16, 12);
    }

    /** {@code n} seeded batches of IMAGES with labels 0..9, on sub-managers of {@code m}. */
    private static List<Batch> batches(NDManager m, int n, long seed) {
        List<Batch> out = new ArrayList<>();
        for (int b = 0; b < n; b++) {
            out.add(WrapUserModelExample.syntheticBatch(m, IMAGES, seed + b));
        }
        return out;
    }

    private static float[] predict(Block block, NDManager m, NDList input) {
        try (NDManager scope = m.newSubManager()) {
            return block.forward(new ParameterStore(scope, false), input, false).singletonOrThrow().toFloatArray();
        }
    }

    @Test
    void checkpointingWrapsTheMlpInSqrtNSegmentsAndTrains() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            NDArray x = m.randomUniform(-1, 1, new Shape(16, 3, 4, 4));
            NDArray y = m.randomInteger(0, 10, new Shape(16), DataType.INT32).toType(DataType.FLOAT32, false);
            ArrayDataset data = new ArrayDataset.Builder().setData(x).optLabels(y).setSampling(8, false).build();
            List<String> wrapped = CheckpointingSnippet.trainCheckpointed(mlp(), data, IMAGES);
            // all six children (flatten, 3 x Linear, 2 x ReLU), in segments of ceil(sqrt(6)) = 3
            assertEquals(List.of("0", "1", "2", "3", "4", "5"), wrapped);
        }
    }

    @Test
    void mixedPrecisionLowersTheLossOfARepeatedBatch() {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(3);
            Batch batch = batches(m, 1, 3).get(0);
            List<Batch> same = List.of(batch, batch, batch, batch, batch, batch);
            List<Float> losses = MixedPrecisionSnippet.trainMixedPrecision(mlp(), same, IMAGES, m);
            assertEquals(6, losses.size());
            assertTrue(losses.get(5) < losses.get(0), losses.toString());
        }
    }

    @Test
    void quantizeReplacesEveryLinear() {
        try (NDManager m = NDManager.newBaseManager()) {
            Block block = mlp();
            block.initialize(m, DataType.FLOAT32, IMAGES);
            QuantizationReport report = QuantizeSnippet.quantize(block, false);
            assertEquals(3, report.layers().size());
            assertTrue(report.bytesAfter() * 3 < report.bytesBefore(), report.toString());
            Block int4 = UserModels.mlp(3 * 4 * 4, 10, 256);
            int4.initialize(m, DataType.FLOAT32, IMAGES);
            // 48 inputs: no group size divides them, the first layer is skipped and says why; 256 inputs take 128
            QuantizationReport r4 = QuantizeSnippet.quantize(int4, true);
            assertEquals(1, r4.layers().size(), r4.toString());
            assertEquals(128, r4.layers().get(0).groupSize());
        }
    }

    @Test
    void loraTrainsAdaptersSavesThemAndMerges() throws Exception {
        try (Model model = Model.newInstance("user-model"); NDManager m = NDManager.newBaseManager()) {
            SequentialBlock net = mlp();
            DefaultTrainingConfig config = new DefaultTrainingConfig(Loss.softmaxCrossEntropyLoss())
                    .optOptimizer(Optimizer.sgd().setLearningRateTracker(Tracker.fixed(0.2f)).build());
            LoraReport report = LoraSnippet.trainAdapters(model, net, IMAGES, config, batches(m, 3, 5),
                    tmp.resolve("adapter"));
            // rank 4 on 48 -> 16, 16 -> 12 and 12 -> 10: 4 x (48 + 16 + 16 + 12 + 12 + 10)
            assertEquals(4 * (48 + 16 + 16 + 12 + 12 + 10), report.trainableParameters());
            assertTrue(Files.isRegularFile(tmp.resolve("adapter/adapter_model.safetensors")));
            assertInstanceOf(Linear.class, net.getChildren().get(1).getValue(), "merged back into a plain Linear");
        }
    }

    @Test
    void exportedArtifactLoadsOntoAFreshModelWithIdenticalOutputs() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            Block trained = mlp();
            trained.initialize(m, DataType.FLOAT32, IMAGES);
            Batch batch = batches(m, 1, 9).get(0);
            Block fresh = ExportSnippet.exportAndLoad(trained, GuideSnippetsTest::mlp, IMAGES, tmp.resolve("art"), m);
            assertArrayEquals(predict(trained, m, batch.getData()), predict(fresh, m, batch.getData()));
        }
    }

    @Test
    void checkpointedDeepSeekStepHasThePlainLoss() throws Exception {
        long[] ids = {3, 14, 15, 92, 65, 35, 89, 79};
        float loss = DeepSeekTrainingSnippet.checkpointedStep(V3, Device.cpu(), ids, 2);
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            NDArray input = m.create(ids, new Shape(2, 4));
            NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(input), false).head();
            assertEquals(CausalLmLoss.mean(logits, input).getFloat(), loss, 1e-5f);
        }
    }

    private Path v3WithTokenizer() throws Exception {
        Path dir = Files.createDirectories(tmp.resolve("v3"));
        for (String f : new String[] {"config.json", "generation_config.json", "model.safetensors"}) {
            Files.copy(V3.resolve(f), dir.resolve(f));
        }
        for (String f : new String[] {"tokenizer.json", "tokenizer_config.json"}) {
            Files.copy(TOKENIZER.resolve(f), dir.resolve(f));
        }
        return dir;
    }

    @Test
    void predictorGenerationEqualsTheGenerator() throws Exception {
        Path out = tmp.resolve("int8");
        GenerationResult r = DeepSeekGenerateSnippet.quantizeAndGenerate(v3WithTokenizer(), out, "w10 w20 w30");
        try (GenerationModel g = GenerationModel.open(out, Device.cpu(), DataType.FLOAT32);
                NDManager m = NDManager.newBaseManager()) {
            long[] prompt = g.tokenizer().orElseThrow().encode("w10 w20 w30");
            GenerationResult direct = g.generator().generate(m, List.of(prompt), SamplingParams.greedy(16), null,
                    () -> false).get(0);
            assertArrayEquals(direct.outputIds(), r.outputIds());
        }
    }

    @Test
    void fineTunerTrainsAndSaves() throws Exception {
        Path model = v3WithTokenizer();
        Path corpus = Files.createDirectories(tmp.resolve("corpus"));
        StringBuilder sb = new StringBuilder();
        Random r = new Random(2);
        for (int i = 0; i < 2000; i++) {
            sb.append('w').append(6 + r.nextInt(30)).append(' ');
        }
        Files.writeString(corpus.resolve("a.txt"), sb.toString());
        long skipped = FineTunerSnippet.fineTune(model, corpus, tmp.resolve("ft"), Device.cpu(), 16, 1);
        assertTrue(skipped <= 1, "at most the first FP16 step overflows: " + skipped);
        assertTrue(Files.isRegularFile(tmp.resolve("ft/model.safetensors")));
        assertTrue(Files.isDirectory(tmp.resolve("ft/checkpoints/step-1")));
    }

    @Test
    void streamingInt4LoadEqualsLoadThenQuantize() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM streamed = StreamingLoadSnippet.loadInt4(V3, m);
            assertInstanceOf(QuantizedLinear.class, Blocks.get(streamed, "model.layers.0.self_attn.o_proj"));
            DeepSeekForCausalLM loaded = DeepSeekLoader.load(V3, m, DataType.FLOAT16);
            Quantizer.quantize(loaded, Int4WeightOnlyConfig.builder().optGroupSize(128).build());
            NDList input = new NDList(m.create(new long[] {3, 14, 15, 92}, new Shape(1, 4)));
            assertArrayEquals(
                    streamed.forward(new ParameterStore(m, false), input, false).head().toType(DataType.FLOAT32, false)
                            .toFloatArray(),
                    loaded.forward(new ParameterStore(m, false), input, false).head().toType(DataType.FLOAT32, false)
                            .toFloatArray());
        }
    }

    @Test
    void adapterInferenceFollowsTransformersLogits() throws Exception {
        Path peft = FIXTURES.resolve("tiny-deepseek-v3-lora");
        long[] prompt;
        float[] last;
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(peft.resolve("reference.safetensors"))) {
            prompt = ref.load(m, "input_ids").get(1).toLongArray();
            last = ref.load(m, "logits_with_adapter").get(1).get(prompt.length - 1).toFloatArray();
        }
        int argmax = 0;
        for (int i = 1; i < last.length; i++) {
            argmax = last[i] > last[argmax] ? i : argmax;
        }
        long[] out = AdapterInferenceSnippet.generateWithAdapter(V3, peft, prompt);
        assertEquals(argmax, out[0], "the first token is transformers' argmax with the adapter");
    }

    @Test
    void peftTargetsAdaptAttentionDenseAndSharedMlpsButNoRoutedExpert() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            PeftTargetsSnippet.adaptAttentionAndMlp(lm);
            java.util.Set<String> adapted = new java.util.TreeSet<>();
            Blocks.walk(lm).forEach((path, b) -> {
                if (b instanceof ai.djl.memopt.lora.LoraLinear) {
                    adapted.add(path);
                }
            });
            assertTrue(adapted.contains("model.layers.0.self_attn.o_proj"), adapted.toString());
            assertTrue(adapted.contains("model.layers.0.mlp.gate_proj"), "the dense MLP: " + adapted);
            assertTrue(adapted.stream().anyMatch(p -> p.contains("shared_experts.up_proj")), "shared experts: " + adapted);
            assertTrue(adapted.stream().noneMatch(p -> p.contains(".experts.")), "no routed expert: " + adapted);
        }
    }

    @Test
    void ggufQ4ExportReloadsToTheSameQuantizedModel() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM back = GgufSnippet.exportQ4AndReload(V3, tmp.resolve("m.gguf"), m);
            DeepSeekForCausalLM ours = DeepSeekLoader.load(V3, m, DataType.FLOAT32);
            ai.djl.memopt.gguf.GgufQuantizer.quantize(ours, ai.djl.memopt.gguf.GgmlType.Q4_0);
            NDList input = new NDList(m.create(new long[] {3, 14, 15, 92}, new Shape(1, 4)));
            assertArrayEquals(ours.forward(new ParameterStore(m, false), input, false).head().toFloatArray(),
                    back.forward(new ParameterStore(m, false), input, false).head().toFloatArray(),
                    "the reloaded Q4_0 model computes exactly what the in-memory one does");
        }
    }
}
