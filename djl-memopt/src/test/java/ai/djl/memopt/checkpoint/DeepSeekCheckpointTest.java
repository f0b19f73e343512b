package ai.djl.memopt.checkpoint;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.function.Supplier;
import org.junit.jupiter.api.Test;

/** Activation checkpointing of every decoder layer of the DeepSeek model gives the gradients of the plain model. */
class DeepSeekCheckpointTest {

    static DeepSeekConfig tiny(String type) {
        return DeepSeekConfig.builder(type).vocabSize(128).hiddenSize(32).intermediateSize(64)
                .moeIntermediateSize(16).numHiddenLayers(3).numAttentionHeads(2).qLoraRank(16).kvLoraRank(16)
                .qkNopeHeadDim(8).qkRopeHeadDim(4).vHeadDim(8).nRoutedExperts(8).nSharedExperts(1)
                .numExpertsPerTok(2).nGroup(4).topkGroup(2).firstKDenseReplace(1).maxPositionEmbeddings(64).build();
    }

    static Map<String, float[]> gradients(
            DeepSeekForCausalLM lm, NDManager manager, long[] ids, Supplier<GradientCollector> collector) {
        for (Parameter p : BlockTrees.parameters(lm).values()) {
            JniUtils.zeroGrad((PtNDArray) p.getArray());
        }
        try (NDManager step = manager.newSubManager()) {
            NDArray input = step.create(ids, new Shape(2, ids.length / 2));
            NDArray mask = step.ones(new Shape(2, ids.length / 2), DataType.INT64);
            mask.set(new ai.djl.ndarray.index.NDIndex("1, 0:2"), 0); // left padding on the second row
            ParameterStore ps = new ParameterStore(step, false);
            try (GradientCollector gc = collector.get()) {
                NDArray logits = lm.forward(ps, new NDList(input, mask), true).head();
                gc.backward(CausalLmLoss.mean(logits, input, mask));
            }
            Map<String, float[]> grads = new LinkedHashMap<>();
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(lm).entrySet()) {
                if (e.getValue().requiresGradient()) {
                    try (NDArray g = e.getValue().getArray().getGradient()) {
                        grads.put(e.getKey(), g.toFloatArray());
                    }
                }
            }
            return grads;
        }
    }

    /** Two rows of 10 token ids {@code (i * step + offset) % 128}. */
    private static long[] ids(int step, int offset) {
        long[] ids = new long[2 * 10];
        for (int i = 0; i < ids.length; i++) {
            ids[i] = (i * step + offset) % 128;
        }
        return ids;
    }

    /** Equal within 1e-6 of the largest gradient (FP32), on gradients that are not all tiny. */
    private static void assertSameGradients(Map<String, float[]> expected, Map<String, float[]> actual, String what) {
        double largest = CheckpointTestModels.maxAbs(expected);
        assertTrue(largest > 1e-3, what + ": largest gradient " + largest);
        double diff = CheckpointTestModels.maxAbsDiff(expected, actual);
        assertTrue(diff <= 1e-6 * Math.max(1, largest), what + ": max abs diff " + diff + ", largest gradient "
                + largest);
    }

    @Test
    void attentionMlpAndExpertsNestedInCheckpointedLayersGiveTheSameGradients() {
        for (String type : List.of(DeepSeekConfig.DEEPSEEK_V3, DeepSeekConfig.DEEPSEEK_V2)) {
            try (NDManager manager = NDManager.newBaseManager()) {
                DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(type), 5, manager, DataType.FLOAT32);
                long[] ids = ids(53, 7);
                Map<String, float[]> expected = gradients(lm, manager, ids, () -> manager.getEngine()
                        .newGradientCollector());
                List<String> before = List.copyOf(BlockTrees.parameters(lm).keySet());
                for (String layer : Checkpointing.wrapChildren(BlockTrees.get(lm, "model.layers"), CheckpointPolicy.all())) {
                    assertEquals(List.of("self_attn", "mlp"), Checkpointing.wrapChildren(lm, "model.layers." + layer,
                            CheckpointPolicy.matching((n, b) -> n.equals("self_attn") || n.equals("mlp"))));
                }
                // a third level: the routed experts of the two MoE layers, inside their checkpointed mlp
                for (String layer : List.of("1", "2")) {
                    assertEquals(8, Checkpointing.wrapChildren(lm, "model.layers." + layer + ".mlp.experts",
                            CheckpointPolicy.all()).size());
                }
                assertEquals(before, List.copyOf(BlockTrees.parameters(lm).keySet()), "HF parameter names unchanged");
                CheckpointingGradientCollector[] gc = new CheckpointingGradientCollector[1];
                Map<String, float[]> actual = gradients(lm, manager, ids,
                        () -> gc[0] = CheckpointingGradientCollector.open(manager));
                // 3 layers, then 2 halves in each, then in the 2 MoE layers each expert that received tokens (20
                // tokens x 2 choices over 8 experts: several, fewer than 8 only if some got none)
                long experts = gc[0].recordedSegments() - 3 - 3 * 2;
                assertTrue(experts >= 2 * 4 && experts <= 2 * 8, type + ": expert segments " + experts);
                assertSameGradients(expected, actual, type);
            }
        }
    }

    @Test
    void everyDecoderLayerCheckpointedGivesTheSameGradients() {
        for (String type : List.of(DeepSeekConfig.DEEPSEEK_V3, DeepSeekConfig.DEEPSEEK_V2)) {
            try (NDManager manager = NDManager.newBaseManager()) {
                DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(type), 7, manager, DataType.FLOAT32);
                long[] ids = ids(37, 11);
                Map<String, float[]> expected = gradients(lm, manager, ids, () -> manager.getEngine()
                        .newGradientCollector());
                List<String> before = List.copyOf(BlockTrees.parameters(lm).keySet());
                List<String> wrapped = Checkpointing.wrapChildren(
                        BlockTrees.get(lm, "model.layers"), CheckpointPolicy.all(), true);
                assertEquals(List.of("0", "1", "2"), wrapped);
                assertInstanceOf(CheckpointBlock.class, lm.model().layers().get(1));
                assertEquals(before, List.copyOf(BlockTrees.parameters(lm).keySet()), "HF parameter names unchanged");
                CheckpointingGradientCollector[] gc = new CheckpointingGradientCollector[1];
                Map<String, float[]> actual = gradients(lm, manager, ids,
                        () -> gc[0] = CheckpointingGradientCollector.open(manager));
                // the rotary tables and the mask are constants and each layer reads the previous one's output: no
                // recomputed layer keeps its graph for later (the first, which reads the embeddings, is visited last)
                assertEquals(0, gc[0].retainedSegmentBackwards(), type);
                assertEquals(3, gc[0].recordedSegments(), type);
                // the attention, MoE experts, shared experts, router bias-free weights and norms of every layer
                assertTrue(expected.containsKey("model.layers.2.mlp.experts.3.down_proj.weight"));
                assertSameGradients(expected, actual, type);
            }
        }
    }
}
