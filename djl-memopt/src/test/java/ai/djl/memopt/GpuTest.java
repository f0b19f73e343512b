package ai.djl.memopt;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.engine.Engine;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.StepResult;
import ai.djl.memopt.finetune.TokenBatch;
import ai.djl.memopt.inference.ExpertDispatch;
import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.MlaCachedDecoder;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.model.deepseek.MultiHeadLatentAttention;
import ai.djl.memopt.model.deepseek.RotaryEmbedding;
import ai.djl.memopt.nn.FusedAttention;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.testing.SystemProperties;
import ai.djl.memopt.testing.Vjp;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import java.net.URISyntaxException;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.List;
import java.util.SplittableRandom;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/**
 * The product on a CUDA GPU: the transformers fixtures' logits and greedy tokens, training steps in FP32 and FP16, and a
 * long generation with flat device memory. Tagged {@code gpu} and skipped where the engine sees no GPU (CI has none);
 * docs/gpu.md says how they were run on one.
 */
@Tag("gpu")
class GpuTest {

    private static final Device GPU = Device.gpu();

    @BeforeAll
    static void needsGpu() {
        org.junit.jupiter.api.Assumptions.assumeTrue(Engine.getInstance().getGpuCount() > 0, "no GPU visible");
    }

    static Path fixture(String name) {
        try {
            return Path.of(GpuTest.class.getResource("/fixtures/" + name + "/config.json").toURI()).getParent();
        } catch (URISyntaxException e) {
            throw new IllegalStateException(e);
        }
    }

    private static float maxAbsDiff(NDArray a, NDArray b) {
        try (NDArray d = a.toType(DataType.FLOAT32, false).toDevice(Device.cpu(), false)
                .sub(b.toType(DataType.FLOAT32, false).toDevice(Device.cpu(), false)).abs()) {
            return d.max().getFloat();
        }
    }

    /** Logits of the fixture's input on the GPU within 1e-4 of transformers' (FP32 weights). */
    @ParameterizedTest
    @ValueSource(strings = {"tiny-deepseek-v3", "tiny-deepseek-v2"})
    void fixtureLogitsMatchTransformersOnTheGpu(String name) throws Exception {
        Path dir = fixture(name);
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, GPU, DataType.FLOAT32);
                SafetensorsFile reference = SafetensorsFile.open(dir.resolve("reference.safetensors"));
                NDManager m = NDManager.newBaseManager(GPU)) {
            NDArray ids = reference.load(m, "input_ids").toDevice(GPU, false);
            NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(ids), false).head();
            assertTrue(logits.getDevice().isGpu(), "logits computed on " + logits.getDevice());
            float d = maxAbsDiff(logits, reference.load(m, "logits"));
            System.out.printf("%s logits on the GPU: max abs diff %.3g%n", name, d);
            assertTrue(d < 1e-4, name + " logits differ by " + d);
        }
    }

    /** Greedy decoding with the compressed MLA cache on the GPU, both expert dispatches, gives transformers' tokens. */
    @ParameterizedTest
    @ValueSource(strings = {"tiny-deepseek-v3", "tiny-deepseek-v2"})
    void greedyTokensMatchTransformersOnTheGpu(String name) throws Exception {
        Path dir = fixture(name);
        long[] prompt;
        long[] full;
        try (SafetensorsFile reference = SafetensorsFile.open(dir.resolve("reference.safetensors"));
                NDManager m = NDManager.newBaseManager()) {
            prompt = reference.load(m, "greedy_prompt").toLongArray();
            full = reference.load(m, "greedy_output").toLongArray();
        }
        long[] expected = Arrays.copyOfRange(full, prompt.length, full.length);
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, GPU, DataType.FLOAT32)) {
            SamplingParams params = SamplingParams.builder().setMaxNewTokens(expected.length).optIgnoreEos(true)
                    .build();
            for (ExpertDispatch experts : ExpertDispatch.values()) {
                GenerationResult r = new Generator(new MlaCachedDecoder(lm, GPU, experts), null).generate(prompt,
                        params);
                assertArrayEquals(expected, r.outputIds(), name + " " + experts);
            }
        }
    }

    /**
     * PyTorch's fused attention kernel (the GPU default) against the eager formula on the GPU, in FP32 and FP16 at
     * bench-small's head sizes (query and key 96, value 64): outputs and the gradients of query, key and value.
     */
    @ParameterizedTest
    @ValueSource(strings = {"float32", "float16"})
    void fusedAttentionEqualsEagerOnTheGpu(String type) throws Exception {
        DataType dtype = "float16".equals(type) ? DataType.FLOAT16 : DataType.FLOAT32;
        DeepSeekConfig config = DeepSeekConfig.preset("bench-small");
        MultiHeadLatentAttention attn = new MultiHeadLatentAttention(config, new RotaryEmbedding(config));
        try (NDManager m = NDManager.newBaseManager(GPU)) {
            Engine.getInstance().setRandomSeed(5);
            NDArray q = m.randomNormal(new Shape(2, 16, 512, 96)).toType(dtype, false);
            NDArray k = m.randomNormal(new Shape(2, 16, 512, 96)).toType(dtype, false);
            NDArray v = m.randomNormal(new Shape(2, 16, 512, 64)).toType(dtype, false);
            NDArray up = m.randomNormal(new Shape(2, 16, 512, 64)).toType(dtype, false);
            NDArray[] eager = SystemProperties.with(FusedAttention.KERNEL_PROPERTY, "eager",
                    () -> Vjp.of(in -> attn.attend(in.get(0), in.get(1), in.get(2), null), up, q, k, v));
            NDArray[] fused = SystemProperties.with(FusedAttention.KERNEL_PROPERTY, "fused",
                    () -> Vjp.of(in -> attn.attend(in.get(0), in.get(1), in.get(2), null), up, q, k, v));
            double tolerance = dtype == DataType.FLOAT16 ? 1e-2 : 1e-4;
            String[] names = {"output", "dq", "dk", "dv"};
            for (int i = 0; i < names.length; i++) {
                float max = eager[i].toType(DataType.FLOAT32, false).abs().max().getFloat();
                float d = maxAbsDiff(eager[i], fused[i]);
                System.out.printf("fused attention %s %s: max abs diff %.3g (max %.3g)%n", type, names[i], d, max);
                assertTrue(max > 0 && d <= tolerance * max, type + " " + names[i] + " differs by " + d);
            }
        }
    }

    private static TokenBatch batch(long seed, int rows, int seq, int vocab) {
        SplittableRandom r = new SplittableRandom(seed);
        long[] ids = new long[rows * seq];
        for (int i = 0; i < ids.length; i++) {
            ids[i] = r.nextInt(vocab);
        }
        return new TokenBatch(ids, rows, seq);
    }

    /**
     * A training step on the GPU with its defaults (fused optimizer, device-side loss and overflow check) starts from
     * the CPU's loss (FP32, the same weights and batch) and keeps matching it for the next steps; in FP16 with nested
     * checkpointing the losses are finite, close to FP32's, and the weights move.
     */
    @Test
    void trainingStepsOnTheGpu() throws Exception {
        Path dir = fixture("tiny-deepseek-v3");
        DeepSeekConfig config = DeepSeekConfig.fromJson(dir.resolve("config.json"));
        int steps = 3;
        double[][] losses = new double[3][steps];
        Device[] devices = {Device.cpu(), GPU, GPU};
        for (int v = 0; v < 3; v++) {
            boolean fp16 = v == 2;
            try (DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, devices[v], DataType.FLOAT32);
                    FineTuner tuner = FineTuner.builder().setModel(lm)
                            .optCheckpointing(fp16 ? "nested+experts" : "all")
                            .optPrecision(fp16 ? FineTuner.Precision.FP16 : FineTuner.Precision.FP32)
                            .optLearningRate(1e-3f).optLossChunkTokens(16).build()) {
                float before = lm.model().layers().get(1).getParameters().valueAt(0).getArray().toType(
                        DataType.FLOAT32, false).sum().getFloat();
                for (int s = 0; s < steps; s++) {
                    StepResult r = tuner.step(batch(s, 2, 24, config.vocabSize()));
                    assertTrue(Double.isFinite(r.loss()), "step " + s + " loss " + r.loss());
                    losses[v][s] = r.loss();
                }
                float after = lm.model().layers().get(1).getParameters().valueAt(0).getArray().toType(
                        DataType.FLOAT32, false).sum().getFloat();
                assertTrue(before != after, "variant " + v + ": the weights did not move");
            }
        }
        System.out.printf("losses: cpu fp32 %s, gpu fp32 %s, gpu fp16 %s%n", Arrays.toString(losses[0]),
                Arrays.toString(losses[1]), Arrays.toString(losses[2]));
        for (int s = 0; s < steps; s++) {
            assertEquals(losses[0][s], losses[1][s], 1e-4 * Math.abs(losses[0][s]), "FP32 step " + s);
            assertEquals(losses[1][s], losses[2][s], 2e-2 * Math.abs(losses[1][s]), "FP16 step " + s);
        }
    }

    /**
     * A thousand greedy tokens on the GPU: the same arrays stay alive after every step and device memory (device-wide)
     * does not grow between token 100 and token 1000 beyond allocator noise.
     */
    @Test
    void longGenerationKeepsDeviceMemoryFlat() throws Exception {
        DeepSeekConfig config = DeepSeekConfig.fromJson(fixture("tiny-deepseek-v3").resolve("config.json"))
                .toBuilder().numHiddenLayers(2).maxPositionEmbeddings(2048).build();
        try (DeepSeekForCausalLM model = DeepSeekForCausalLM.random(config, 7, GPU, DataType.FLOAT32);
                NDManager m = NDManager.newBaseManager(GPU)) {
            Generator g = new Generator(new MlaCachedDecoder(model, GPU), null);
            int n = 1000;
            SamplingParams params = SamplingParams.builder().setMaxNewTokens(n).optIgnoreEos(true).build();
            g.generate(m, List.of(new long[] {451, 340, 497}), params, null, () -> false); // warm-up
            int[] arrays = new int[n];
            long[] device = new long[n];
            int[] k = new int[1];
            GenerationResult r = g.generate(m, List.of(new long[] {451, 340, 497}), params, (i, id, d) -> {
                arrays[k[0]] = m.getManagedArrays().size();
                device[k[0]++] = MemoryStats.deviceBytesInUse(GPU);
            }, () -> false).get(0);
            assertEquals(n, r.outputIds().length);
            for (int s = 1; s < n; s++) {
                assertEquals(arrays[0], arrays[s], "arrays alive after step " + s);
            }
            long growth = device[n - 1] - device[99];
            System.out.printf("1,000 tokens on the GPU: %d live arrays per step, device memory %d MiB at step 100, %+d"
                    + " KiB by step 1000%n", arrays[0], device[99] >> 20, growth >> 10);
            assertFalse(growth > 16L << 20, "device memory grew by " + (growth >> 10) + " KiB");
        }
    }
}
