package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.checkpoint.CheckpointBlock;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Parameter;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class FineTunerTest {

    @TempDir Path tmp;

    static DeepSeekConfig tiny() {
        return tinyBuilder().build();
    }

    static DeepSeekConfig.Builder tinyBuilder() {
        return DeepSeekConfig.builder(DeepSeekConfig.DEEPSEEK_V3).vocabSize(64).hiddenSize(32).intermediateSize(64)
                .moeIntermediateSize(16).numHiddenLayers(3).numAttentionHeads(2).qLoraRank(16).kvLoraRank(16)
                .qkNopeHeadDim(8).qkRopeHeadDim(4).vHeadDim(8).nRoutedExperts(4).nSharedExperts(1)
                .numExpertsPerTok(2).nGroup(2).topkGroup(1).firstKDenseReplace(1).maxPositionEmbeddings(64);
    }

    /** A corpus with structure to learn: a repeated pseudo-random phrase of 40 tokens. */
    static TokenDataset data(long seed) {
        SplittableRandom r = new SplittableRandom(7);
        int[] phrase = new int[40];
        for (int i = 0; i < phrase.length; i++) {
            phrase[i] = r.nextInt(64);
        }
        int[] stream = new int[40 * 30];
        for (int i = 0; i < stream.length; i++) {
            stream[i] = phrase[i % 40];
        }
        return TokenDataset.fromTokens(stream, 16, 0.1, seed);
    }

    static Map<String, float[]> weights(FineTuner tuner) throws Exception {
        Path dir = Files.createTempDirectory("weights");
        try {
            tuner.saveModel(dir);
            Map<String, float[]> out = new LinkedHashMap<>();
            try (SafetensorsFile f = SafetensorsFile.open(dir.resolve("model.safetensors"))) {
                for (String n : f.names()) {
                    out.put(n, f.readFloats(n));
                }
            }
            return out;
        } finally {
            ai.djl.memopt.safetensors.AtomicFiles.deleteTree(dir);
        }
    }

    static double maxDiff(Map<String, float[]> a, Map<String, float[]> b) {
        assertEquals(a.keySet(), b.keySet());
        double d = 0;
        for (String k : a.keySet()) {
            float[] x = a.get(k);
            float[] y = b.get(k);
            assertEquals(x.length, y.length, k);
            for (int i = 0; i < x.length; i++) {
                d = Math.max(d, Math.abs(x[i] - y[i]));
            }
        }
        return d;
    }

    private static FineTuner.Builder builder(DeepSeekForCausalLM lm, String ckpt, FineTuner.Precision p) {
        return FineTuner.builder().setModel(lm).optCheckpointing(ckpt).optPrecision(p)
                .optSchedule(LearningRateSchedule.of(3e-3f, 2, 8, 0.1f)).optWeightDecay(0.01f)
                .optGradientAccumulation(p == FineTuner.Precision.FP32 ? 2 : 1).optSeed(5);
    }

    private static void train(FineTuner tuner, TokenDataset data, int steps) {
        for (int i = 0; i < steps; i++) {
            StepResult r = tuner.step(data.trainBatch(tuner.dataPosition(), 4));
            assertTrue(Double.isFinite(r.loss()), r.toString());
        }
    }

    private void resumeMatches(FineTuner.Precision precision, String ckpt) throws Exception {
        TokenDataset data = data(5);
        Map<String, float[]> uninterrupted;
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 1, Device.cpu(), DataType.FLOAT32);
                FineTuner tuner = builder(lm, ckpt, precision).build()) {
            train(tuner, data, 5);
            uninterrupted = weights(tuner);
        }
        Path ckptDir = tmp.resolve("checkpoints").resolve("step-3");
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 1, Device.cpu(), DataType.FLOAT32);
                FineTuner tuner = builder(lm, ckpt, precision).build()) {
            train(tuner, data, 3);
            tuner.saveCheckpoint(ckptDir);
            train(tuner, data, 1); // progress after the save is lost on restore
        }
        assertEquals(ckptDir, FineTuner.latestCheckpoint(tmp.resolve("checkpoints")));
        // a different initialisation: everything must come from the checkpoint
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 99, Device.cpu(), DataType.FLOAT32);
                FineTuner tuner = builder(lm, ckpt, precision).build()) {
            tuner.restoreCheckpoint(ckptDir);
            assertEquals(3, tuner.step());
            assertEquals(12, tuner.dataPosition());
            train(tuner, data, 2);
            double d = maxDiff(uninterrupted, weights(tuner));
            assertTrue(d <= 1e-6, "resumed weights differ by " + d);
        }
        // the checkpoint directory is also a model directory
        try (DeepSeekForCausalLM back = DeepSeekLoader.load(ckptDir, Device.cpu(), DataType.FLOAT32)) {
            assertEquals(tiny(), back.config());
        }
    }

    @Test
    void resumeGivesTheUninterruptedWeightsFp32() throws Exception {
        resumeMatches(FineTuner.Precision.FP32, "all");
    }

    @Test
    void resumeGivesTheUninterruptedWeightsFp16() throws Exception {
        resumeMatches(FineTuner.Precision.FP16, "none");
    }

    @Test
    void checkpointingAndAccumulationKeepTheUpdate() throws Exception {
        TokenDataset data = data(3);
        Map<String, Map<String, float[]>> results = new LinkedHashMap<>();
        java.util.List<Double> losses = new java.util.ArrayList<>();
        String[][] variants = {{"none", "1", "100000"}, {"all", "1", "100000"}, {"every:2", "2", "100000"},
            {"sqrt", "4", "100000"}, {"none", "1", "16"}, {"all", "2", "8"}, {"nested", "1", "100000"},
            {"nested+experts", "2", "8"}};
        for (String[] v : variants) {
            try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 2, Device.cpu(), DataType.FLOAT32);
                    FineTuner tuner = FineTuner.builder().setModel(lm).optCheckpointing(v[0])
                            .optOptimizer(StatefulOptimizer.Kind.SGD).optLearningRate(0.5f)
                            .optGradientAccumulation(Integer.parseInt(v[1])).optLossChunkTokens(Integer.parseInt(v[2]))
                            .build()) {
                StepResult r = tuner.step(data.trainBatch(0, 4));
                losses.add(r.loss());
                results.put(v[0] + "/" + v[1] + "/" + v[2], weights(tuner));
                if (!v[0].equals("none")) {
                    assertFalse(tuner.checkpointedLayers().isEmpty());
                }
                // nested: each layer's attention and MLP are checkpoint blocks inside the checkpointed layer
                assertEquals(v[0].startsWith("nested"), BlockTrees.get(lm, "model.layers.1.mlp") instanceof CheckpointBlock,
                        v[0]);
                assertEquals(v[0].equals("nested+experts"),
                        BlockTrees.get(lm, "model.layers.1.mlp.experts.0") instanceof CheckpointBlock, v[0]);
            }
        }
        for (double loss : losses) {
            assertEquals(losses.get(0), loss, 1e-5, losses.toString());
        }
        Map<String, float[]> plain = results.get("none/1/100000");
        Map<String, float[]> init;
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 2, Device.cpu(), DataType.FLOAT32);
                FineTuner tuner = FineTuner.builder().setModel(lm).build()) {
            init = weights(tuner);
        }
        assertTrue(maxDiff(plain, init) > 1e-3, "the step changed the weights");
        for (Map.Entry<String, Map<String, float[]>> e : results.entrySet()) {
            double d = maxDiff(plain, e.getValue());
            assertTrue(d < 1e-5, e.getKey() + " differs from the plain step by " + d);
        }
    }

    /**
     * One SGD step in FP16 moves every weight as the FP32 step does: gradients flow through every FP16/FP32 cast
     * (attention softmax, rotary, norms, logits). Dense layers only: with a random router FP16 flips near-tied top-k
     * choices, which changes which tokens reach an expert (the MoE path is trained in the FP16 loss test).
     */
    @Test
    void fp16UpdateFollowsTheFp32Update() throws Exception {
        TokenDataset data = data(3);
        DeepSeekConfig dense = tinyBuilder().firstKDenseReplace(3).build();
        Map<String, float[]> init;
        Map<String, Map<String, float[]>> after = new LinkedHashMap<>();
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(dense, 4, Device.cpu(), DataType.FLOAT32);
                FineTuner tuner = FineTuner.builder().setModel(lm).build()) {
            init = weights(tuner);
        }
        for (FineTuner.Precision p : FineTuner.Precision.values()) {
            try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(dense, 4, Device.cpu(), DataType.FLOAT32);
                    FineTuner tuner = FineTuner.builder().setModel(lm).optPrecision(p).optCheckpointing("all")
                            .optOptimizer(StatefulOptimizer.Kind.SGD).optLearningRate(1f).build()) {
                assertFalse(tuner.step(data.trainBatch(0, 4)).skipped());
                after.put(p.name(), weights(tuner));
            }
        }
        double totalNum = 0;
        double totalDen = 0;
        for (String name : init.keySet()) {
            if (name.endsWith("e_score_correction_bias")) {
                continue;
            }
            float[] w0 = init.get(name);
            float[] a = after.get("FP32").get(name);
            float[] b = after.get("FP16").get(name);
            double num = 0;
            double den = 0;
            for (int i = 0; i < w0.length; i++) {
                double d32 = a[i] - w0[i];
                double d16 = b[i] - w0[i];
                num += (d32 - d16) * (d32 - d16);
                den += d32 * d32;
            }
            assertTrue(den > 0, name + " did not move");
            assertTrue(Math.sqrt(num / den) < 0.05, name + ": FP16 update off by " + Math.sqrt(num / den));
            totalNum += num;
            totalDen += den;
        }
        assertTrue(Math.sqrt(totalNum / totalDen) < 0.02, "FP16 update off by " + Math.sqrt(totalNum / totalDen));
    }

    /** Every trainable parameter's gradient as FP32 values, by name. */
    private static Map<String, float[]> gradients(DeepSeekForCausalLM lm) {
        Map<String, float[]> out = new LinkedHashMap<>();
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(lm).entrySet()) {
            if (!e.getValue().requiresGradient() || out.containsKey(e.getKey())) {
                continue;
            }
            try (ai.djl.ndarray.NDArray g = e.getValue().getArray().getGradient();
                    ai.djl.ndarray.NDArray f = g.toType(DataType.FLOAT32, true)) {
                out.put(e.getKey(), f.toFloatArray());
            }
        }
        return out;
    }

    /**
     * The memory-saving gradient paths of a step - the token embedding's gradient added row by row, the loss-head
     * chunks differentiated by hand with the head's weight gradient added in blocks of vocabulary rows - give the
     * gradients autograd gives. Two backward passes on different batches into the same buffers (the first creates them
     * through autograd in both runs, the second takes the row-wise paths in one run and autograd in the other), then
     * every parameter's gradient is compared.
     */
    private void rowwiseGradientsMatchAutograd(FineTuner.Precision precision, String ckpt, boolean tied,
            double tolerance) {
        TokenDataset data = data(9);
        DeepSeekConfig config = tinyBuilder().tieWordEmbeddings(tied).build();
        float factor = precision == FineTuner.Precision.FP16 ? 256f : 1f;
        Map<String, float[]> reference = null;
        for (int variant = 0; variant < 3; variant++) { // autograd, row-wise, row-wise in the GPU form
            boolean rowwise = variant > 0;
            try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(config, 6, Device.cpu(), DataType.FLOAT32);
                    FineTuner tuner = FineTuner.builder().setModel(lm).optCheckpointing(ckpt).optPrecision(precision)
                            .optLossChunkTokens(12).build()) {
                tuner.rowwiseGradients = rowwise;
                tuner.setGpuForms(variant == 2);
                tuner.accumulateGradients(data.trainBatch(0, 2), factor);
                tuner.accumulateGradients(data.trainBatch(2, 2), factor);
                if (rowwise) {
                    assertEquals(1, tuner.rowwiseEmbeddings, "the second pass gathers embedding rows");
                    assertEquals(3, tuner.manualHeadChunks, "15 targets in chunks of 8 positions: 2 chunks per"
                            + " pass, all but the very first by hand");
                }
                Map<String, float[]> grads = gradients(lm);
                if (reference == null) {
                    reference = grads;
                    continue;
                }
                assertEquals(reference.keySet(), grads.keySet());
                for (String name : reference.keySet()) {
                    float[] a = reference.get(name);
                    float[] b = grads.get(name);
                    double max = 0;
                    double diff = 0;
                    for (int i = 0; i < a.length; i++) {
                        max = Math.max(max, Math.abs(a[i]));
                        diff = Math.max(diff, Math.abs(a[i] - b[i]));
                    }
                    if (name.endsWith("embed_tokens.weight") || name.endsWith("lm_head.weight")) {
                        assertTrue(max > 0, name + " has no gradient");
                    }
                    assertTrue(diff <= tolerance * Math.max(max, 1e-3), precision + "/" + ckpt + "/tied " + tied
                            + "/variant " + variant + ": " + name + " differs from autograd by " + diff + " (max " + max
                            + ")");
                }
            }
        }
    }

    /**
     * The GPU form of the FP16 overflow check (the loss and every gradient's maximum and minimum, one read) agrees with
     * the blocked per-parameter check: true on real gradients, false once one element of one gradient is set to
     * infinity or NaN, and false for a non-finite loss.
     */
    @Test
    void gpuOverflowCheckAgreesWithBlockedCheck() {
        TokenDataset data = data(9);
        for (float poison : new float[] {Float.POSITIVE_INFINITY, Float.NEGATIVE_INFINITY, Float.NaN}) {
            try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 6, Device.cpu(), DataType.FLOAT32);
                    FineTuner tuner = FineTuner.builder().setModel(lm).optPrecision(FineTuner.Precision.FP16)
                            .build()) {
                tuner.accumulateGradients(data.trainBatch(0, 2), 256f);
                ai.djl.ndarray.NDArray loss = lm.manager().create(2.5f);
                ai.djl.ndarray.NDArray badLoss = lm.manager().create(poison);
                assertTrue(tuner.update().lossAndGradientsFinite(loss), "real gradients are finite");
                assertFalse(tuner.update().lossAndGradientsFinite(badLoss), "GPU check sees a " + poison + " loss");
                Parameter p = BlockTrees.parameters(lm).get("model.layers.1.mlp.experts.2.down_proj.weight");
                ai.djl.ndarray.NDArray g = p.getArray().getGradient();
                boolean gradMode = ai.djl.pytorch.jni.JniUtils.isGradMode();
                ai.djl.pytorch.jni.JniUtils.setGradMode(false);
                try {
                    g.set(new ai.djl.ndarray.index.NDIndex("1, 3"), poison);
                } finally {
                    ai.djl.pytorch.jni.JniUtils.setGradMode(gradMode);
                }
                g.close();
                assertFalse(ParameterUpdate.allFinite(p.getArray().getGradient()), "blocked check sees " + poison);
                assertFalse(tuner.update().lossAndGradientsFinite(loss), "GPU check sees " + poison);
                loss.close();
                badLoss.close();
            }
        }
    }

    /**
     * Training with the GPU forms (flat-bucket optimizer, one-read overflow check, whole head gradient), forced here on
     * the CPU, gives the weights of the CPU forms after a few steps, in FP32 (with gradient accumulation and
     * checkpointing) and in FP16.
     */
    @Test
    void gpuPathsTrainLikeTheCpuPaths() throws Exception {
        TokenDataset data = data(4);
        for (FineTuner.Precision precision : FineTuner.Precision.values()) {
            Map<String, float[]> reference = null;
            for (boolean gpu : new boolean[] {false, true}) {
                try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 8, Device.cpu(), DataType.FLOAT32);
                        FineTuner tuner = builder(lm, "all", precision).optLossChunkTokens(12).build()) {
                    tuner.setGpuForms(gpu);
                    train(tuner, data, 4);
                    Map<String, float[]> w = weights(tuner);
                    if (reference == null) {
                        reference = w;
                    } else {
                        double d = maxDiff(reference, w);
                        System.out.printf("%s: GPU forms vs CPU forms, max weight difference %.3g%n", precision, d);
                        assertTrue(d < (precision == FineTuner.Precision.FP32 ? 1e-5 : 1e-3), precision + ": " + d);
                    }
                }
            }
        }
    }

    @Test
    void rowwiseGradientsMatchAutogradFp32() {
        rowwiseGradientsMatchAutograd(FineTuner.Precision.FP32, "none", false, 1e-6);
        rowwiseGradientsMatchAutograd(FineTuner.Precision.FP32, "all", true, 1e-6);
    }

    @Test
    void rowwiseGradientsMatchAutogradFp16() {
        rowwiseGradientsMatchAutograd(FineTuner.Precision.FP16, "all", false, 2e-3);
    }

    @Test
    void lossDecreasesAndMemoryStaysFlatFp32() {
        TokenDataset data = data(11);
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 3, Device.cpu(), DataType.FLOAT32);
                FineTuner tuner = FineTuner.builder().setModel(lm).optCheckpointing("all")
                        .optLearningRate(1e-2f).optGradientAccumulation(2).build()) {
            double first = tuner.evaluate(data.heldOutBatch(0, data.heldOutSequences()));
            int arraysAfterWarmup = -1;
            for (int i = 0; i < 30; i++) {
                tuner.step(data.trainBatch(tuner.dataPosition(), 4));
                if (i == 2) {
                    arraysAfterWarmup = lm.manager().getManagedArrays().size();
                }
            }
            assertEquals(arraysAfterWarmup, lm.manager().getManagedArrays().size(), "arrays leak per step");
            double after = tuner.evaluate(data.heldOutBatch(0, data.heldOutSequences()));
            assertTrue(after < 0.5 * first, "held-out loss " + first + " -> " + after);
            assertEquals(0, tuner.stateBytes().masters());
            assertEquals(1f, tuner.lossScale());
        }
    }

    @Test
    void lossDecreasesAndMemoryStaysFlatFp16() {
        TokenDataset data = data(11);
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 3, Device.cpu(), DataType.FLOAT32);
                FineTuner tuner = FineTuner.builder().setModel(lm).optCheckpointing("all")
                        .optPrecision(FineTuner.Precision.FP16).optLearningRate(2e-2f).optGradientAccumulation(2)
                        .build()) {
            double first = tuner.evaluate(data.heldOutBatch(0, data.heldOutSequences()));
            int arraysAfterWarmup = -1;
            StepResult last = null;
            for (int i = 0; i < 12; i++) {
                last = tuner.step(data.trainBatch(tuner.dataPosition(), 4));
                if (i == 2) {
                    arraysAfterWarmup = lm.manager().getManagedArrays().size();
                }
            }
            assertEquals(arraysAfterWarmup, lm.manager().getManagedArrays().size(), "arrays leak per step");
            double after = tuner.evaluate(data.heldOutBatch(0, data.heldOutSequences()));
            assertTrue(after < 0.5 * first, "held-out loss " + first + " -> " + after);
            assertEquals(64, last.tokens());
            assertEquals(12, tuner.step());
            StateBytes s = tuner.stateBytes();
            long params = 0;
            long trainable = 0;
            for (Parameter p : BlockTrees.parameters(lm).values()) {
                params += p.getArray().size();
                trainable += p.requiresGradient() ? p.getArray().size() : 0;
            }
            // projections: FP16 working copies with FP32 masters; embedding, norms, router: FP32
            assertTrue(s.masters() > params * 4 / 2 && s.masters() < params * 4, s.toString());
            assertEquals(params * 4 - s.masters() / 2, s.weights(), s.toString());
            // every trainable parameter has a gradient of its own type (the router's correction bias is not trained)
            assertTrue(s.gradients() <= s.weights() && s.gradients() > 0.99 * s.weights(), s.toString());
            assertEquals(trainable * 4 * 2, s.optimizer()); // two FP32 moments
        }
    }

    @Test
    void badInputIsRejectedClearly() throws Exception {
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 1, Device.cpu(), DataType.FLOAT16)) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> FineTuner.builder().setModel(lm).build());
            assertTrue(e.getMessage().contains("FLOAT32"), e.getMessage());
        }
        assertThrows(IllegalArgumentException.class, () -> FineTuner.checkpointPolicy("every:x"));
        assertThrows(IllegalArgumentException.class, () -> FineTuner.checkpointPolicy("some"));
        assertThrows(IllegalArgumentException.class, () -> FineTuner.Precision.parse("bf16"));
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 1, Device.cpu(), DataType.FLOAT32);
                FineTuner tuner = FineTuner.builder().setModel(lm).optGradientAccumulation(3).build()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> tuner.step(TokenBatch.of(new long[][] {{1, 2, 3}, {4, 5, 6}})));
            assertTrue(e.getMessage().contains("micro-batches"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class,
                    () -> tuner.step(TokenBatch.of(new long[][] {{1, 2, 300}, {4, 5, 6}, {1, 1, 1}})));
            assertTrue(e.getMessage().contains("vocabulary"), e.getMessage());
            // a checkpoint of another precision is refused, naming it
            tuner.saveCheckpoint(tmp.resolve("c"));
        }
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(tiny(), 1, Device.cpu(), DataType.FLOAT32);
                FineTuner tuner = FineTuner.builder().setModel(lm).optPrecision(FineTuner.Precision.FP16).build()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> tuner.restoreCheckpoint(tmp.resolve("c")));
            assertTrue(e.getMessage().contains("fp32"), e.getMessage());
        }
        assertThrows(java.io.IOException.class, () -> FineTuner.latestCheckpoint(tmp.resolve("none")));
    }
}
