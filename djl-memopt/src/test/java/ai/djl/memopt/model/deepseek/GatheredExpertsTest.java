package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.lora.LoraLinear;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.HostReads;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.core.Linear;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/** The gathered (sync-free) expert dispatch against the sorted dispatch on the same experts. */
class GatheredExpertsTest {

    private static DeepSeekMoE moe(DeepSeekForCausalLM lm, int layer) {
        return (DeepSeekMoE) ((DeepSeekDecoderLayer) lm.model().layers().get(layer)).mlp();
    }

    private static List<DeepSeekMoE> moes(DeepSeekForCausalLM lm) {
        List<DeepSeekMoE> list = new ArrayList<>();
        for (int i = 0; i < lm.model().layers().size(); i++) {
            Block mlp = ((DeepSeekDecoderLayer) lm.model().layers().get(i)).mlp();
            if (mlp instanceof DeepSeekMoE) {
                list.add((DeepSeekMoE) mlp);
            }
        }
        return list;
    }

    /** (N, H) gaussian rows of the model's type. */
    private static NDArray input(NDManager m, long seed, int n, int h, DataType type) {
        NDArray x = m.randomNormal(0, 1, new Shape(n, h), DataType.FLOAT32, m.getDevice());
        return x.toType(type, false);
    }

    /** max |sorted - gathered| over the routed output of {@code x}, optionally with a tiny chunk budget. */
    private static float difference(DeepSeekMoE moe, NDManager m, NDArray x, long chunkBytes) {
        ParameterStore ps = new ParameterStore(m, false);
        try (NDManager step = m.newSubManager()) {
            NDArray xs = x.duplicate();
            xs.attach(step);
            NDList route = moe.gate().forward(ps, new NDList(xs), false);
            NDArray sorted = moe.dispatch(ps, xs, route.get(0), route.get(1), false);
            NDArray gathered = moe.dispatchGathered(xs, route.get(0), route.get(1), chunkBytes);
            assertEquals(sorted.getShape(), gathered.getShape());
            assertEquals(x.getDataType(), gathered.getDataType());
            float d = Fixtures.maxAbsDiff(sorted, gathered);
            float scale = Fixtures.maxAbsDiff(sorted, sorted.zerosLike());
            Block projection = ((DeepSeekMlp) moe.experts().get(0)).gateProj();
            System.out.printf("%s %s, %d tokens: max |sorted| %.3g, max |sorted - gathered| %.3g%n",
                    x.getDataType(), projection, x.getShape().get(0), scale, d);
            // not vacuous: the output is far above the bound, and the difference is small relative to it too
            assertTrue(scale > 1e-4f, "routed output is ~0: " + scale);
            float relative = x.getDataType() == DataType.FLOAT16 ? 1e-3f : 1e-5f;
            assertTrue(d <= relative * scale, "max |sorted - gathered| " + d + " against max |sorted| " + scale);
            return d;
        }
    }

    @ParameterizedTest
    @ValueSource(strings = {"tiny-deepseek-v3", "tiny-deepseek-v2"})
    void gatheredEqualsSortedOnTheTransformersFixture(String name) throws IOException {
        Path dir = Fixtures.V3.resolveSibling(name);
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(5);
            DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, m, DataType.FLOAT32);
            int h = lm.config().hiddenSize();
            for (DeepSeekMoE moe : moes(lm)) {
                NDArray x = input(m, 1, 4, h, DataType.FLOAT32);
                // before stacking, the sorted path on the experts' own arrays
                ParameterStore ps = new ParameterStore(m, false);
                NDList route = moe.gate().forward(ps, new NDList(x), false);
                NDArray before = moe.dispatch(ps, x, route.get(0), route.get(1), false);
                NDArray w = ((DeepSeekMlp) moe.experts().get(5)).downProj().getParameters().get("weight").getArray();
                float[] values = w.toFloatArray();
                assertTrue(moe.enableGatheredDispatch());
                // the same array object, now a view of the stack, reads back the same bytes (as a checkpoint writer would)
                assertSame(w, ((DeepSeekMlp) moe.experts().get(5)).downProj().getParameters().get("weight").getArray());
                assertArrayEquals(values, w.toFloatArray());
                NDArray after = moe.dispatch(ps, x, route.get(0), route.get(1), false);
                assertEquals(0f, Fixtures.maxAbsDiff(before, after), "stacking changed the experts' weights");
                for (long budget : new long[] {DeepSeekMoE.DEFAULT_GATHER_CHUNK_BYTES, 1}) {
                    float d = difference(moe, m, x, budget); // budget 1: one assignment per chunk
                    assertTrue(d < 1e-6f, name + ": max |sorted - gathered| = " + d + " (chunk budget " + budget + ")");
                }
            }
        }
    }

    /** A fixture-shaped config with more, wider experts, random weights. */
    private static DeepSeekForCausalLM random(NDManager m, DataType type) throws IOException {
        DeepSeekConfig c = DeepSeekConfig.fromJson(Fixtures.V3.resolve("config.json")).toBuilder()
                .hiddenSize(128).moeIntermediateSize(64).nRoutedExperts(16).numExpertsPerTok(4).numHiddenLayers(2)
                .build();
        return DeepSeekForCausalLM.random(c, 11, m, type);
    }

    @Test
    void gatheredEqualsSortedOnRandomInputsFp32AndFp16() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(7);
            DeepSeekMoE fp32 = moe(random(m, DataType.FLOAT32), 1);
            for (int n : new int[] {1, 3, 4, 9}) {
                float d = difference(fp32, m, input(m, n, n, 128, DataType.FLOAT32), 1L << 20);
                assertTrue(d < 1e-6f, "fp32, " + n + " tokens: " + d);
            }
            DeepSeekMoE fp16 = moe(random(m, DataType.FLOAT16), 1);
            for (int n : new int[] {1, 4}) {
                float d = difference(fp16, m, input(m, n, n, 128, DataType.FLOAT16), 1L << 20);
                // FP16 matmuls: a batched and a plain kernel could round differently (one FP16 ulp relative, checked
                // in difference()); on CPU both give the same bits (measured 0)
                assertTrue(d < 1e-6f, "fp16, " + n + " tokens: " + d);
            }
        }
    }

    @ParameterizedTest
    @ValueSource(strings = {"int8", "int4", "int4-awq"})
    void quantizedExpertsGatherTheSameAsTheSortedPathOnTheSameExperts(String scheme) throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(3);
            DeepSeekForCausalLM lm = random(m, DataType.FLOAT32);
            if ("int8".equals(scheme)) {
                Quantizer.quantize(lm, Int8WeightOnlyConfig.builder().build());
            } else if ("int4".equals(scheme)) {
                Quantizer.quantize(lm, Int4WeightOnlyConfig.builder().optGroupSize(32).build());
            } else {
                // AWQ-style input scales on every expert projection, by hand
                DeepSeekMoE moe = moe(lm, 1);
                for (int e = 0; e < moe.experts().size(); e++) {
                    for (String p : List.of("gate_proj", "up_proj", "down_proj")) {
                        String path = "model.layers.1.mlp.experts." + e + "." + p;
                        BlockTrees.replace(lm, path, b -> {
                            NDArray w = b.getParameters().get("weight").getArray();
                            NDArray s = m.randomUniform(0.5f, 2f, new Shape(w.getShape().get(1)));
                            return QuantizedLinear.of(
                                    QuantizedTensor.quantize(w, QuantScheme.INT4_WEIGHT_ONLY, 32, s), null, DataType.FLOAT32);
                        });
                    }
                }
            }
            DeepSeekMoE moe = moe(lm, 1);
            Block gp = ((DeepSeekMlp) moe.experts().get(0)).gateProj();
            assertTrue(gp instanceof QuantizedLinear, "experts quantized: " + gp);
            NDArray before = ((QuantizedLinear) gp).weight(m);
            for (int n : new int[] {1, 4, 7}) {
                float d = difference(moe, m, input(m, n, n, 128, DataType.FLOAT32), 1L << 20);
                assertTrue(d < 1e-6f, scheme + ", " + n + " tokens: " + d);
            }
            // the same block and arrays, now views of the stacks, with the same dequantized weight
            Block now = ((DeepSeekMlp) moe.experts().get(0)).gateProj();
            assertSame(gp, now);
            assertEquals(0f, Fixtures.maxAbsDiff(before, ((QuantizedLinear) now).weight(m)));
            assertEquals("int4-awq".equals(scheme), ((QuantizedLinear) now).quantizedWeight().inputScales().isPresent());
        }
    }

    @Test
    void stacksAreTheExpertsStorageAndFollowChanges() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(9);
            DeepSeekForCausalLM lm = random(m, DataType.FLOAT32);
            DeepSeekMoE moe = moe(lm, 1);
            assertTrue(moe.enableGatheredDispatch());
            NDArray x = input(m, 0, 4, 128, DataType.FLOAT32);
            ParameterStore ps = new ParameterStore(m, false);
            NDList route = moe.gate().forward(ps, new NDList(x), false);
            NDArray first = moe.dispatchGathered(x, route.get(0), route.get(1), 1L << 20);

            // an in-place change of an expert's weight reaches the gathered path: the parameter is a view of the stack
            for (int e = 0; e < moe.experts().size(); e++) {
                ((DeepSeekMlp) moe.experts().get(e)).downProj().getParameters().get("weight").getArray().muli(2f);
            }
            NDArray doubled = moe.dispatchGathered(x, route.get(0), route.get(1), 1L << 20);
            assertTrue(Fixtures.maxAbsDiff(first.mul(2f), doubled) < 1e-5f, "in-place update not seen by the stacks");
            assertTrue(difference(moe, m, x, 1L << 20) < 1e-6f);

            // a replaced projection (of an expert the router chose) is detected and the stacks rebuilt
            int chosen = (int) route.get(0).toLongArray()[0];
            DeepSeekMlp expert = (DeepSeekMlp) moe.experts().get(chosen);
            Linear fresh = Projections.linear(64);
            fresh.initialize(m, DataType.FLOAT32, new Shape(1, 128));
            BlockTrees.replaceChild(expert, "gate_proj", fresh);
            assertSame(fresh, expert.gateProj());
            NDArray replaced = moe.dispatchGathered(x, route.get(0), route.get(1), 1L << 20);
            assertTrue(Fixtures.maxAbsDiff(replaced, doubled) > 1e-5f, "the new projection changed nothing");
            assertTrue(difference(moe, m, x, 1L << 20) < 1e-6f, "stale stacks after replacing a projection");

            // gradients still reach the (view) expert weights through the sorted path
            try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                NDArray y = moe.forward(new ParameterStore(m, false), new NDList(x.reshape(1, 4, 128)), true).head();
                gc.backward(y.sum());
            }
            float g = 0;
            for (int e = 0; e < moe.experts().size(); e++) {
                NDArray grad = ((DeepSeekMlp) moe.experts().get(e)).upProj().getParameters().get("weight").getArray()
                        .getGradient();
                g = Math.max(g, grad.abs().max().getFloat());
            }
            assertTrue(g > 0, "no gradient reached the stacked expert weights");
        }
    }

    @Test
    void decodeSizedForwardReadsNothingAndLargerOnesUseTheSortedPath() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(4);
            DeepSeekMoE moe = moe(random(m, DataType.FLOAT32), 1); // 16 experts, 4 per token
            ParameterStore ps = new ParameterStore(m, false);
            NDArray x4 = input(m, 0, 4, 128, DataType.FLOAT32).reshape(4, 1, 128); // 4 tokens: 16 assignments
            NDArray x5 = input(m, 0, 5, 128, DataType.FLOAT32).reshape(5, 1, 128); // 20 > 16
            long start = HostReads.count();
            moe.forward(ps, new NDList(x4), false);
            assertEquals(start + 1, HostReads.count(), "not enabled: the sorted path reads the ids");
            assertTrue(moe.enableGatheredDispatch());
            long before = HostReads.count();
            NDArray gathered = moe.forward(ps, new NDList(x4), false).head();
            assertEquals(before, HostReads.count(), "the gathered path read the device");
            moe.forward(ps, new NDList(x5), false);
            assertEquals(before + 1, HostReads.count(), "above the limit: the sorted path");
            moe.forward(ps, new NDList(x4), true);
            assertEquals(before + 2, HostReads.count(), "training: the sorted path");
            moe.setGatheredDispatchLimit(0);
            NDArray sorted = moe.forward(ps, new NDList(x4), false).head();
            assertEquals(before + 3, HostReads.count());
            assertTrue(Fixtures.maxAbsDiff(sorted, gathered) < 1e-6f);
        }
    }

    @ParameterizedTest
    @ValueSource(strings = {"fp32", "int8"})
    void loraExpertsGatherTheSameAsTheSortedPath(String base) throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(6);
            DeepSeekForCausalLM lm = random(m, DataType.FLOAT32);
            if ("int8".equals(base)) {
                Quantizer.quantize(lm, Int8WeightOnlyConfig.builder().build()); // QLoRA-style: adapters over int8
            }
            DeepSeekMoE moe = moe(lm, 1);
            for (int e = 0; e < moe.experts().size(); e++) {
                for (String p : List.of("gate_proj", "up_proj", "down_proj")) {
                    BlockTrees.replace(lm, "model.layers.1.mlp.experts." + e + "." + p, b -> {
                        LoraLinear l = LoraLinear.builder().setBase(b).setRank(2).optAlpha(4).optManager(m).build();
                        // a trained-looking B: a fresh adapter (B = 0) would leave the outputs unchanged
                        l.setAdapterWeights(l.loraA().getArray(),
                                m.randomNormal(0, 0.1f, new Shape(l.outFeatures(), 2), DataType.FLOAT32, m.getDevice()));
                        return l;
                    });
                }
            }
            NDArray x = input(m, 0, 4, 128, DataType.FLOAT32);
            ParameterStore ps = new ParameterStore(m, false);
            NDList route = moe.gate().forward(ps, new NDList(x), false);
            NDArray withAdapters = moe.dispatch(ps, x, route.get(0), route.get(1), false);
            assertTrue(moe.enableGatheredDispatch());
            for (int n : new int[] {1, 4}) {
                float d = difference(moe, m, input(m, n, n, 128, DataType.FLOAT32), 1L << 20);
                assertTrue(d < 1e-6f, base + " + LoRA, " + n + " tokens: " + d);
            }
            // the adapters matter, and a new adapter value (interned) is picked up by a rebuild
            LoraLinear first = (LoraLinear) ((DeepSeekMlp) moe.experts().get((int) route.get(0).toLongArray()[0])).downProj();
            first.setAdapterWeights(first.loraA().getArray(), first.loraB().getArray().mul(3f));
            NDArray changed = moe.dispatchGathered(x, route.get(0), route.get(1), 1L << 20);
            assertTrue(Fixtures.maxAbsDiff(changed, withAdapters) > 1e-5f, "new adapter weights not seen");
            assertTrue(difference(moe, m, x, 1L << 20) < 1e-6f);
        }
    }

    @Test
    void mixedExpertsKeepTheSortedPath() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(2);
            DeepSeekForCausalLM lm = random(m, DataType.FLOAT32);
            BlockTrees.replace(lm, "model.layers.1.mlp.experts.3.up_proj",
                    b -> LoraLinear.builder().setBase(b).setRank(2).optManager(m).build());
            DeepSeekMoE moe = moe(lm, 1);
            assertFalse(moe.enableGatheredDispatch());
            assertTrue(moe.isGatheredDispatchEnabled());
            NDArray x = input(m, 0, 1, 128, DataType.FLOAT32).reshape(1, 1, 128);
            long before = HostReads.count();
            NDArray y = moe.forward(new ParameterStore(m, false), new NDList(x), false).head();
            assertEquals(before + 1, HostReads.count(), "one LoRA expert among plain ones: sorted path");
            assertEquals(new Shape(1, 1, 128), y.getShape());
            assertTrue(((DeepSeekMlp) moe.experts().get(0)).gateProj().getParameters().get("weight").getArray()
                    .getShape().equals(new Shape(64, 128)), "nothing was stacked");
        }
    }
}
