package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Parameter;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.Map;
import java.util.Random;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class DeepSeekBlocksTest {

    @TempDir Path tmp;

    static DeepSeekConfig.Builder tiny(String type) {
        return DeepSeekConfig.builder(type).vocabSize(128).hiddenSize(32).intermediateSize(64)
                .moeIntermediateSize(16).numHiddenLayers(2).numAttentionHeads(2).qLoraRank(16).kvLoraRank(16)
                .qkNopeHeadDim(8).qkRopeHeadDim(4).vHeadDim(8).nRoutedExperts(8).nSharedExperts(1)
                .numExpertsPerTok(2).nGroup(4).topkGroup(2).firstKDenseReplace(1).maxPositionEmbeddings(64);
    }

    @Test
    void v3RotaryDeinterleavesThenRotatesHalf() {
        DeepSeekConfig c = tiny(DeepSeekConfig.DEEPSEEK_V3).build();
        RotaryEmbedding rope = new RotaryEmbedding(c);
        float[] inv = rope.inverseFrequencies();
        assertArrayEquals(new float[] {1f, 0.01f}, inv, 1e-7f); // 10000^(-2i/4)
        try (NDManager m = NDManager.newBaseManager()) {
            float[] x = {0.3f, -1.2f, 2.0f, 0.7f};
            long p = 5; // an offset position, as when decoding
            NDList cs = rope.cosSin(m.create(new long[] {p}).reshape(1, 1));
            float[] out = rope.apply(m.create(x).reshape(1, 1, 1, 4), cs).toFloatArray();
            double a0 = p * inv[0];
            double a1 = p * inv[1];
            // de-interleaved [x0, x2, x1, x3]; pairs (x0, x1) and (x2, x3) rotate by a0 and a1
            float[] expected = {
                (float) (x[0] * Math.cos(a0) - x[1] * Math.sin(a0)),
                (float) (x[2] * Math.cos(a1) - x[3] * Math.sin(a1)),
                (float) (x[1] * Math.cos(a0) + x[0] * Math.sin(a0)),
                (float) (x[3] * Math.cos(a1) + x[2] * Math.sin(a1))
            };
            assertArrayEquals(expected, out, 1e-5f);
        }
    }

    @Test
    void v2RotaryMultipliesAdjacentPairsAsComplexNumbers() {
        DeepSeekConfig c = tiny(DeepSeekConfig.DEEPSEEK_V2).nGroup(1).topkGroup(1).build();
        RotaryEmbedding rope = new RotaryEmbedding(c);
        float[] inv = rope.inverseFrequencies();
        try (NDManager m = NDManager.newBaseManager()) {
            float[] x = {0.3f, -1.2f, 2.0f, 0.7f};
            long p = 7;
            NDList cs = rope.cosSin(m.create(new long[] {p}).reshape(1, 1));
            float[] out = rope.apply(m.create(x).reshape(1, 1, 1, 4), cs).toFloatArray();
            double a0 = p * inv[0];
            double a1 = p * inv[1];
            float[] expected = {
                (float) (x[0] * Math.cos(a0) - x[1] * Math.sin(a0)),
                (float) (x[0] * Math.sin(a0) + x[1] * Math.cos(a0)),
                (float) (x[2] * Math.cos(a1) - x[3] * Math.sin(a1)),
                (float) (x[2] * Math.sin(a1) + x[3] * Math.cos(a1))
            };
            assertArrayEquals(expected, out, 1e-5f);
        }
    }

    @Test
    void yarnBlendsFrequenciesBetweenTheCorrectionDims() throws Exception {
        // the V2 fixture: dim 8, base 1e4, factor 4 from 64 positions, beta 32/1 -> ramp over dims [0, 2]
        DeepSeekConfig c = DeepSeekConfig.fromJson(Fixtures.V2.resolve("config.json"));
        float[] inv = new RotaryEmbedding(c).inverseFrequencies();
        float[] expected = {1f, 0.5f * (0.1f / 4) + 0.5f * 0.1f, 0.01f / 4, 0.001f / 4};
        assertArrayEquals(expected, inv, 1e-7f);
        // transformers uses max_position_embeddings / original_max_position_embeddings as the factor when both exist
        com.google.gson.JsonObject o = com.google.gson.JsonParser.parseString(
                java.nio.file.Files.readString(Fixtures.V2.resolve("config.json"))).getAsJsonObject();
        o.addProperty("max_position_embeddings", 512);
        float[] eight = new RotaryEmbedding(DeepSeekConfig.fromJsonString(o.toString())).inverseFrequencies();
        assertEquals(0.001f / 8, eight[3], 1e-9f);
        assertEquals(1f, eight[0], 0f);
        // truncate false: the ramp runs over the unrounded correction range [0, 1.008...]
        o.addProperty("max_position_embeddings", 256);
        o.getAsJsonObject("rope_parameters").addProperty("truncate", false);
        DeepSeekConfig untruncated = DeepSeekConfig.fromJsonString(o.toString());
        double high = 8 * Math.log(64 / (2 * Math.PI)) / (2 * Math.log(10000));
        double ramp = 1 / high;
        float[] un = new RotaryEmbedding(untruncated).inverseFrequencies();
        assertEquals((float) (0.025 * ramp + 0.1 * (1 - ramp)), un[1], 1e-7f);
        assertEquals(untruncated, DeepSeekConfig.fromJsonString(untruncated.toJson()));
        DeepSeekConfig lite = DeepSeekConfig.preset("deepseek-v2-lite");
        double m = 0.1 * 0.707 * Math.log(40) + 1;
        assertEquals(Math.pow(192, -0.5) * m * m, lite.softmaxScale(), 1e-12);
    }

    /** The routed experts' sum computed densely (every expert on every token, weighted by a host-built matrix). */
    @Test
    void expertDispatchEqualsDenseComputationAndRouterMatchesHandComputation() {
        DeepSeekConfig c = tiny(DeepSeekConfig.DEEPSEEK_V3).build();
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(c, 3, m, DataType.FLOAT32);
            DeepSeekMoE moe = (DeepSeekMoE) ((DeepSeekDecoderLayer) lm.model().layers().get(1)).mlp();
            MoeGate gate = (MoeGate) moe.gate();
            Random r = new Random(1);
            float[] bias = new float[8];
            for (int i = 0; i < 8; i++) {
                bias[i] = (float) r.nextGaussian() * 0.05f;
            }
            gate.correctionBias().getArray().set(bias);
            int n = 10;
            int h = c.hiddenSize();
            float[] xs = new float[n * h];
            for (int i = 0; i < xs.length; i++) {
                xs[i] = (float) r.nextGaussian();
            }
            NDArray x = m.create(xs, new Shape(n, h));
            ParameterStore ps = new ParameterStore(m, false);
            NDList route = gate.forward(ps, new NDList(x), false);
            long[] idx = route.get(0).toLongArray();
            float[] w = route.get(1).toFloatArray();

            // router by hand
            float[] gw = gate.weight().getArray().toFloatArray();
            for (int t = 0; t < n; t++) {
                double[] s = new double[8];
                double[] choice = new double[8];
                for (int e = 0; e < 8; e++) {
                    double dot = 0;
                    for (int j = 0; j < h; j++) {
                        dot += xs[t * h + j] * gw[e * h + j];
                    }
                    s[e] = 1 / (1 + Math.exp(-dot));
                    choice[e] = s[e] + bias[e];
                }
                double[] group = new double[4];
                for (int g = 0; g < 4; g++) {
                    group[g] = choice[2 * g] + choice[2 * g + 1]; // top-2 of a 2-expert group
                }
                Integer[] gOrder = {0, 1, 2, 3};
                Arrays.sort(gOrder, (a, b) -> Double.compare(group[b], group[a]));
                double[] masked = new double[8];
                for (int k = 0; k < 2; k++) {
                    masked[2 * gOrder[k]] = choice[2 * gOrder[k]];
                    masked[2 * gOrder[k] + 1] = choice[2 * gOrder[k] + 1];
                }
                Integer[] eOrder = {0, 1, 2, 3, 4, 5, 6, 7};
                Arrays.sort(eOrder, (a, b) -> Double.compare(masked[b], masked[a]));
                long[] got = {idx[2 * t], idx[2 * t + 1]};
                Arrays.sort(got);
                long[] want = {eOrder[0], eOrder[1]};
                Arrays.sort(want);
                assertArrayEquals(want, got, "token " + t);
                double denom = s[(int) idx[2 * t]] + s[(int) idx[2 * t + 1]];
                assertEquals(s[(int) idx[2 * t]] / denom * 2.5, w[2 * t], 1e-5);
            }

            // dispatch vs dense
            float[] dense = new float[n * 8];
            for (int t = 0; t < n; t++) {
                for (int k = 0; k < 2; k++) {
                    dense[t * 8 + (int) idx[2 * t + k]] += w[2 * t + k];
                }
            }
            NDArray weights = m.create(dense, new Shape(n, 8));
            NDArray expected = moe.sharedExperts().forward(ps, new NDList(x), false).head();
            for (int e = 0; e < 8; e++) {
                NDArray ye = moe.experts().get(e).forward(ps, new NDList(x), false).head();
                expected = expected.add(ye.mul(weights.get(new NDIndex(":, {}", e)).expandDims(1)));
            }
            NDArray actual = moe.forward(ps, new NDList(x.reshape(1, n, h)), false).head().reshape(n, h);
            assertTrue(Fixtures.maxAbsDiff(expected, actual) < 1e-5);
        }
    }

    @Test
    void leftPaddingWithPositionIdsGivesTheUnpaddedLogits() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(Fixtures.V3.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(Fixtures.V3, m, DataType.FLOAT32);
            ParameterStore ps = new ParameterStore(m, false);
            long[] all = ref.load(m, "input_ids").toLongArray(); // (2, 12)
            long[] short0 = Arrays.copyOfRange(all, 0, 9);
            long[] row0 = new long[12];
            System.arraycopy(short0, 0, row0, 3, 9);
            long[] ids = new long[24];
            System.arraycopy(row0, 0, ids, 0, 12);
            System.arraycopy(all, 12, ids, 12, 12);
            long[] mask = new long[24];
            long[] pos = new long[24];
            for (int i = 0; i < 12; i++) {
                mask[i] = i < 3 ? 0 : 1;
                pos[i] = Math.max(0, i - 3);
                mask[12 + i] = 1;
                pos[12 + i] = i;
            }
            NDArray logits = lm.forward(ps, new NDList(m.create(ids, new Shape(2, 12)), m.create(mask,
                    new Shape(2, 12)), m.create(pos, new Shape(2, 12))), false).head();
            NDArray alone = lm.forward(ps, new NDList(m.create(short0, new Shape(1, 9))), false).head();
            assertTrue(Fixtures.maxAbsDiff(logits.get(new NDIndex("0:1, 3:, :")), alone) < 1e-4);
            assertTrue(Fixtures.maxAbsDiff(logits.get(new NDIndex("1:2, :, :")),
                    ref.load(m, "logits").get(new NDIndex("1:2, :, :"))) < 1e-4);
            // the padded loss ignores the padded targets
            // targets whose mask is 0 are ignored (as labels -100); t0 after the padding has no unpadded counterpart
            long[] targetMask = Arrays.copyOf(mask, 12);
            targetMask[3] = 0;
            float masked = CausalLmLoss.mean(logits.get(new NDIndex("0:1")), m.create(row0, new Shape(1, 12)),
                    m.create(targetMask, new Shape(1, 12))).getFloat();
            float plain = CausalLmLoss.mean(alone, m.create(short0, new Shape(1, 9))).getFloat();
            assertEquals(plain, masked, 1e-5 * plain);
        }
    }

    @Test
    void tiedEmbeddingsHaveNoLmHeadAndRoundTrip() throws Exception {
        DeepSeekConfig c = tiny(DeepSeekConfig.DEEPSEEK_V3).tieWordEmbeddings(true).build();
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(c, 5, m, DataType.FLOAT32);
            Map<String, Parameter> params = BlockTrees.parameters(lm);
            assertFalse(params.containsKey("lm_head.weight"));
            assertEquals(c.parameterCount(), params.values().stream().filter(Parameter::requiresGradient)
                    .mapToLong(p -> p.getArray().size()).sum());
            ParameterStore ps = new ParameterStore(m, false);
            NDArray ids = m.create(new long[] {1, 5, 9, 2}, new Shape(1, 4));
            NDArray hidden = lm.model().forward(ps, new NDList(ids), false).head();
            NDArray expected = hidden.matMul(params.get("model.embed_tokens.weight").getArray().transpose());
            NDArray logits = lm.forward(ps, new NDList(ids), false).head();
            assertTrue(Fixtures.maxAbsDiff(expected, logits) < 1e-6);
            DeepSeekCheckpointWriter.save(lm, c, tmp.resolve("tied"));
            DeepSeekForCausalLM back = DeepSeekLoader.load(tmp.resolve("tied"), m, DataType.FLOAT32);
            assertTrue(Fixtures.maxAbsDiff(logits, back.forward(ps, new NDList(ids), false).head()) == 0f);
        }
    }

    @Test
    void trainingStepsLowerTheLossWithoutLeakingArrays() {
        DeepSeekConfig c = tiny(DeepSeekConfig.DEEPSEEK_V3).build();
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(c, 11, m, DataType.FLOAT32);
            ParameterStore ps = new ParameterStore(m, false);
            long[] data = new long[2 * 16];
            Random r = new Random(2);
            for (int i = 0; i < data.length; i++) {
                data[i] = r.nextInt(128);
            }
            float first = 0;
            float last = 0;
            int arraysAfterWarmup = -1;
            for (int step = 0; step < 12; step++) {
                NDArray ids = m.create(data, new Shape(2, 16));
                GradientCollector gc = Engine.getInstance().newGradientCollector();
                float lossValue;
                try {
                    NDArray logits = lm.forward(ps, new NDList(ids), true).head();
                    NDArray loss = CausalLmLoss.mean(logits, ids);
                    try (NDScope scope = new NDScope()) {
                        scope.suppressNotUsedWarning();
                        gc.backward(loss); // DJL allocates the seed gradient on the loss's manager and never frees it
                    }
                    lossValue = loss.getFloat();
                    loss.close();
                    logits.close();
                } finally {
                    gc.close();
                }
                ids.close();
                for (Parameter p : BlockTrees.parameters(lm).values()) {
                    if (p.requiresGradient()) {
                        try (NDArray g = p.getArray().getGradient(); NDArray upd = g.mul(0.5f)) {
                            p.getArray().subi(upd);
                            g.subi(g); // zero the accumulated gradient
                        }
                    }
                }
                if (step == 0) {
                    first = lossValue;
                }
                last = lossValue;
                int arrays = m.getManagedArrays().size();
                if (step == 2) {
                    arraysAfterWarmup = arrays;
                } else if (step > 2) {
                    if (arrays != arraysAfterWarmup) {
                        for (NDArray a : m.getManagedArrays()) {
                            System.out.println("LEAK? " + a.getShape() + " " + a.getDataType() + " " + a.getName());
                        }
                    }
                    assertEquals(arraysAfterWarmup, arrays, "arrays leaked at step " + step);
                }
            }
            assertTrue(last < first - 0.1, "loss " + first + " -> " + last);
        }
    }

    /** Wraps a block and counts calls; output unchanged unless {@code scale != 1}. */
    static final class Counting extends ai.djl.nn.AbstractBlock {
        final ai.djl.nn.Block inner;
        final float scale;
        int calls;

        Counting(ai.djl.nn.Block inner, float scale) {
            super((byte) 1);
            this.inner = addChildBlock("inner", inner);
            this.scale = scale;
        }

        @Override
        protected NDList forwardInternal(ParameterStore ps, NDList inputs, boolean training,
                ai.djl.util.PairList<String, Object> params) {
            calls++;
            NDArray out = inner.forward(ps, inputs, training).head();
            return new NDList(scale == 1f ? out : out.mul(scale));
        }

        @Override
        public Shape[] getOutputShapes(Shape[] inputShapes) {
            return inputShapes;
        }
    }

    @Test
    void decoratorsPutInPlaceByBlocksReplaceAreCalled() throws Exception {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(Fixtures.V3.resolve("reference.safetensors"))) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(Fixtures.V3, m, DataType.FLOAT32);
            ParameterStore ps = new ParameterStore(m, false);
            NDArray ids = ref.load(m, "input_ids");
            NDArray base = lm.forward(ps, new NDList(ids), false).head();
            String[] paths = {"model.layers.1.self_attn.q_a_proj", "model.layers.1.self_attn.kv_b_proj",
                "model.layers.1.mlp.experts.2.up_proj", "model.layers.1.mlp.shared_experts.down_proj",
                "model.layers.0.mlp.gate_proj", "model.layers.2", "lm_head", "model.norm"};
            java.util.List<Counting> wrappers = new java.util.ArrayList<>();
            for (String p : paths) {
                wrappers.add((Counting) BlockTrees.replace(lm, p, b -> new Counting(b, 1f)));
            }
            NDArray same = lm.forward(ps, new NDList(ids), false).head();
            assertTrue(Fixtures.maxAbsDiff(base, same) == 0f);
            for (int i = 0; i < paths.length; i++) {
                assertTrue(wrappers.get(i).calls > 0, paths[i] + " decorator was not called");
            }
            BlockTrees.replace(lm, "model.layers.1.self_attn.o_proj", b -> new Counting(b, 2f));
            NDArray changed = lm.forward(ps, new NDList(ids), false).head();
            assertTrue(Fixtures.maxAbsDiff(base, changed) > 1e-3);
            IllegalArgumentException e = org.junit.jupiter.api.Assertions.assertThrows(IllegalArgumentException.class,
                    () -> DeepSeekCheckpointWriter.save(lm, lm.config(), tmp.resolve("decorated")));
            assertTrue(e.getMessage().contains("decorator"), e.getMessage());
            assertFalse(java.nio.file.Files.exists(tmp.resolve("decorated").resolve("model.safetensors")));
        }
    }

    @Test
    void v2GroupLimitedGreedyRouterMatchesHandComputation() {
        DeepSeekConfig c = tiny(DeepSeekConfig.DEEPSEEK_V2).topkMethod("group_limited_greedy").nGroup(4).topkGroup(2)
                .numExpertsPerTok(3).normTopkProb(true).routedScalingFactor(1.5).build();
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(c, 9, m, DataType.FLOAT32);
            MoeGate gate = (MoeGate) ((DeepSeekMoE) ((DeepSeekDecoderLayer) lm.model().layers().get(1)).mlp()).gate();
            int n = 12;
            int h = c.hiddenSize();
            Random r = new Random(4);
            float[] xs = new float[n * h];
            for (int i = 0; i < xs.length; i++) {
                xs[i] = (float) r.nextGaussian() * 20; // large inputs so the softmax is far from uniform
            }
            NDList route = gate.forward(new ParameterStore(m, false), new NDList(m.create(xs, new Shape(n, h))),
                    false);
            long[] idx = route.get(0).toLongArray();
            float[] w = route.get(1).toFloatArray();
            float[] gw = gate.weight().getArray().toFloatArray();
            for (int t = 0; t < n; t++) {
                double[] logit = new double[8];
                double max = Double.NEGATIVE_INFINITY;
                for (int e = 0; e < 8; e++) {
                    for (int j = 0; j < h; j++) {
                        logit[e] += xs[t * h + j] * gw[e * h + j];
                    }
                    max = Math.max(max, logit[e]);
                }
                double z = 0;
                double[] p = new double[8];
                for (int e = 0; e < 8; e++) {
                    p[e] = Math.exp(logit[e] - max);
                    z += p[e];
                }
                for (int e = 0; e < 8; e++) {
                    p[e] /= z;
                }
                Integer[] groups = {0, 1, 2, 3};
                Arrays.sort(groups, (a, b) -> Double.compare(Math.max(p[2 * b], p[2 * b + 1]),
                        Math.max(p[2 * a], p[2 * a + 1])));
                double[] masked = new double[8];
                for (int k = 0; k < 2; k++) {
                    masked[2 * groups[k]] = p[2 * groups[k]];
                    masked[2 * groups[k] + 1] = p[2 * groups[k] + 1];
                }
                Integer[] order = {0, 1, 2, 3, 4, 5, 6, 7};
                Arrays.sort(order, (a, b) -> Double.compare(masked[b], masked[a]));
                long[] want = {order[0], order[1], order[2]};
                long[] got = Arrays.copyOfRange(idx, 3 * t, 3 * t + 3);
                double sum = p[(int) got[0]] + p[(int) got[1]] + p[(int) got[2]];
                for (int k = 0; k < 3; k++) {
                    assertEquals(p[(int) got[k]] / sum * 1.5, w[3 * t + k], 1e-5, "token " + t);
                }
                Arrays.sort(want);
                Arrays.sort(got);
                assertArrayEquals(want, got, "token " + t);
            }
        }
    }
}
