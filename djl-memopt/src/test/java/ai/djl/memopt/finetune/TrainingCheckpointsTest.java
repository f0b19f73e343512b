package ai.djl.memopt.finetune;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.pytorch.jni.JniUtils;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.nio.file.StandardOpenOption;
import java.util.List;
import java.util.Map;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Training checkpoints: checksums, run identity, choosing, pruning and crash recovery, and non-finite losses. */
class TrainingCheckpointsTest {

    @TempDir Path tmp;

    private static final TokenDataset DATA = FineTunerTest.data(5);

    /** A tuner on a fresh tiny model; {@code run} goes into its identity as the caller's "data" field. */
    private static FineTuner tuner(DeepSeekForCausalLM lm, String run, FineTuner.Precision precision) {
        return FineTuner.builder().setModel(lm).optPrecision(precision).optLossChunkTokens(16).optSeed(5)
                .optLearningRate(1e-2f).optRunIdentity(Map.of("data", run, "seq", "16")).build();
    }

    private static DeepSeekForCausalLM model(long seed) {
        return DeepSeekForCausalLM.random(FineTunerTest.tiny(), seed, Device.cpu(), DataType.FLOAT32);
    }

    private static void train(FineTuner tuner, int steps) {
        for (int i = 0; i < steps; i++) {
            tuner.step(DATA.trainBatch(tuner.dataPosition(), 4));
        }
    }

    /** Writes checkpoints of run {@code run} at the given steps into {@code dir} ({@code step-NNNNNNNN}). */
    private static void checkpoints(Path dir, String run, int... steps) throws IOException {
        try (DeepSeekForCausalLM lm = model(1); FineTuner tuner = tuner(lm, run, FineTuner.Precision.FP32)) {
            for (int s : steps) {
                train(tuner, s - (int) tuner.step());
                tuner.saveCheckpoint(dir.resolve(String.format("step-%08d", s)));
            }
        }
    }

    private static List<String> names(Path dir) throws IOException {
        try (Stream<Path> s = Files.list(dir)) {
            return s.map(p -> p.getFileName().toString()).sorted().toList();
        }
    }

    static void flipBit(Path file, long at) throws IOException {
        try (FileChannel ch = FileChannel.open(file, StandardOpenOption.READ, StandardOpenOption.WRITE)) {
            ByteBuffer b = ByteBuffer.allocate(1);
            ch.read(b, at);
            b.put(0, (byte) (b.get(0) ^ 0x04));
            ch.write(b.rewind(), at);
        }
    }

    @Test
    void aFlippedBitInACheckpointWeightIsRefusedBeforeAnythingIsRestored() throws Exception {
        Path ckpt = tmp.resolve("step-00000002");
        checkpoints(tmp, "a", 2);
        Path weights = ckpt.resolve("model.safetensors");
        long at;
        try (SafetensorsFile f = SafetensorsFile.open(weights)) {
            at = f.info("model.layers.1.mlp.experts.2.up_proj.weight").fileOffset() + 17;
        }
        flipBit(weights, at);
        try (DeepSeekForCausalLM lm = model(9); FineTuner tuner = tuner(lm, "a", FineTuner.Precision.FP32)) {
            float[] before = lm.model().tokenEmbedding().weight().getArray().toFloatArray();
            IOException e = assertThrows(IOException.class, () -> tuner.restoreCheckpoint(ckpt));
            assertTrue(e.getMessage().contains("model.safetensors is corrupt"), e.getMessage());
            assertTrue(e.getMessage().contains("SHA-256"), e.getMessage());
            assertEquals(0, tuner.step());
            assertArrayEquals(before, lm.model().tokenEmbedding().weight().getArray().toFloatArray(),
                    "nothing is restored from a corrupt checkpoint");
            // a missing file is named too
            flipBit(weights, at);
            Files.delete(ckpt.resolve("optimizer.safetensors"));
            e = assertThrows(IOException.class, () -> tuner.restoreCheckpoint(ckpt));
            assertTrue(e.getMessage().contains("optimizer.safetensors, listed in manifest.json, is missing"),
                    e.getMessage());
        }
    }

    @Test
    void aCheckpointOfAnotherRunIsRefusedNamingWhatDiffers() throws Exception {
        checkpoints(tmp, "a", 2);
        try (DeepSeekForCausalLM lm = model(1);
                FineTuner tuner = FineTuner.builder().setModel(lm).optLossChunkTokens(16).optSeed(6)
                        .optLearningRate(1e-2f).optRunIdentity(Map.of("data", "b", "seq", "16")).build()) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> tuner.restoreCheckpoint(tmp.resolve("step-00000002")));
            assertTrue(e.getMessage().contains("data: a in the checkpoint, b in this run"), e.getMessage());
            assertTrue(e.getMessage().contains("seed: 5 in the checkpoint, 6 in this run"), e.getMessage());
            assertFalse(e.getMessage().contains("seq:"), "only what differs: " + e.getMessage());
        }
    }

    @Test
    void aRunResumesFromItsOwnNewestCheckpointAndPassesOverOtherRuns() throws Exception {
        checkpoints(tmp, "a", 2, 4);
        checkpoints(tmp, "b", 6, 8); // a later run with other data, higher steps
        try (DeepSeekForCausalLM lm = model(3); FineTuner tuner = tuner(lm, "a", FineTuner.Precision.FP32)) {
            CheckpointChoice c = CheckpointDirectory.find(tmp, tuner.runIdentity());
            assertEquals(tmp.resolve("step-00000004"), c.checkpoint());
            assertEquals(4, c.step());
            assertEquals(List.of(tmp.resolve("step-00000008"), tmp.resolve("step-00000006")), c.otherRuns());
            assertTrue(c.note().contains("2 checkpoint(s) of other runs (step-00000008, ...)"), c.note());
            tuner.restoreCheckpoint(c.checkpoint());
            assertEquals(4, tuner.step());
        }
        try (DeepSeekForCausalLM lm = model(3); FineTuner tuner = tuner(lm, "b", FineTuner.Precision.FP32)) {
            CheckpointChoice c = CheckpointDirectory.find(tmp, tuner.runIdentity());
            assertEquals(tmp.resolve("step-00000008"), c.checkpoint());
            assertNull(c.note());
        }
        try (DeepSeekForCausalLM lm = model(3); FineTuner tuner = tuner(lm, "c", FineTuner.Precision.FP32)) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> CheckpointDirectory.find(tmp, tuner.runIdentity()));
            assertTrue(e.getMessage().contains("holds 4 training checkpoint(s), none written by this run"),
                    e.getMessage());
            assertTrue(e.getMessage().contains("data: b in the checkpoint, c in this run"), e.getMessage());
        }
        assertEquals(tmp.resolve("step-00000008"), FineTuner.latestCheckpoint(tmp), "the newest of any run");
    }

    @Test
    void pruningDeletesOnlyThisRunsOlderCheckpoints() throws Exception {
        checkpoints(tmp, "b", 10, 12); // an earlier run's higher-numbered checkpoints
        checkpoints(tmp, "a", 2, 4, 6);
        try (DeepSeekForCausalLM lm = model(1); FineTuner tuner = tuner(lm, "a", FineTuner.Precision.FP32)) {
            List<Path> deleted = CheckpointDirectory.prune(tmp, tuner.runIdentity(), 2);
            assertEquals(List.of(tmp.resolve("step-00000002")), deleted);
            assertEquals(List.of("step-00000004", "step-00000006", "step-00000010", "step-00000012"), names(tmp));
            assertEquals(List.of(tmp.resolve("step-00000012"), tmp.resolve("step-00000010")),
                    CheckpointDirectory.otherRuns(tmp, tuner.runIdentity()));
        }
    }

    @Test
    void checkpointWritesACrashInterruptedAreFinishedOrRolledBack() throws Exception {
        checkpoints(tmp, "a", 2, 4);
        // a checkpoint renamed complete but not yet into place, one half written, one half pruned
        Files.move(tmp.resolve("step-00000004"), tmp.resolve(".step-00000004.new-123"));
        Files.createDirectories(tmp.resolve(".step-00000006.tmp-77")).resolve("model.safetensors").toFile()
                .createNewFile();
        Files.move(tmp.resolve("step-00000002"), tmp.resolve(".step-00000002.deleted-5"));
        try (DeepSeekForCausalLM lm = model(1); FineTuner tuner = tuner(lm, "a", FineTuner.Precision.FP32)) {
            CheckpointChoice c = CheckpointDirectory.find(tmp, tuner.runIdentity());
            assertEquals(tmp.resolve("step-00000004"), c.checkpoint());
            assertEquals(List.of("step-00000004"), names(tmp));
            tuner.restoreCheckpoint(c.checkpoint());
        }
    }

    @Test
    void aCheckpointOfTheEarlierFormatIsRefusedClearly() throws Exception {
        checkpoints(tmp, "a", 2);
        Path state = tmp.resolve("step-00000002/trainer_state.json");
        Files.writeString(state, Files.readString(state).replace("\"format\": 2", "\"format\": 1"));
        try (DeepSeekForCausalLM lm = model(1); FineTuner tuner = tuner(lm, "a", FineTuner.Precision.FP32)) {
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> tuner.restoreCheckpoint(tmp.resolve("step-00000002")));
            assertTrue(e.getMessage().contains("earlier version"), e.getMessage());
        }
    }

    /**
     * The first step of a resumed run takes the paths an uninterrupted run takes after its first step: the embedding
     * gradient row by row and the head's chunks by hand (both need the gradient buffers the first backward creates).
     */
    @Test
    void aResumedStepTakesThePathsOfTheUninterruptedRun() throws Exception {
        long embeddings;
        long chunks;
        try (DeepSeekForCausalLM lm = model(1); FineTuner tuner = tuner(lm, "a", FineTuner.Precision.FP32)) {
            train(tuner, 1);
            tuner.saveCheckpoint(tmp.resolve("step-00000001"));
            long e0 = tuner.rowwiseEmbeddings;
            long c0 = tuner.manualHeadChunks;
            train(tuner, 1);
            embeddings = tuner.rowwiseEmbeddings - e0;
            chunks = tuner.manualHeadChunks - c0;
        }
        assertEquals(1, embeddings);
        assertTrue(chunks > 0);
        try (DeepSeekForCausalLM lm = model(2); FineTuner tuner = tuner(lm, "a", FineTuner.Precision.FP32)) {
            tuner.restoreCheckpoint(tmp.resolve("step-00000001"));
            train(tuner, 1);
            assertEquals(embeddings, tuner.rowwiseEmbeddings);
            assertEquals(chunks, tuner.manualHeadChunks);
        }
    }

    @Test
    void aNonFiniteLossStopsTheRunNamingTheStepAndChangesNothing() throws Exception {
        for (FineTuner.Precision precision : FineTuner.Precision.values()) {
            try (DeepSeekForCausalLM lm = model(1); FineTuner tuner = tuner(lm, "a", precision)) {
                train(tuner, 2);
                NDArray norm = BlockTrees.parameters(lm).get("model.norm.weight").getArray();
                boolean gradMode = JniUtils.isGradMode();
                JniUtils.setGradMode(false); // an in-place write into a leaf that requires grad
                try {
                    norm.set(new NDIndex("3"), Float.NaN);
                } finally {
                    JniUtils.setGradMode(gradMode); // other tests in this JVM expect the engine's default
                }
                float[] embedding = lm.model().tokenEmbedding().weight().getArray().toFloatArray();
                NonFiniteLossException e = assertThrows(NonFiniteLossException.class, () -> train(tuner, 1));
                assertEquals(3, e.step());
                assertTrue(e.getMessage().startsWith("step 3: the loss is NaN"), e.getMessage());
                assertEquals(2, tuner.step(), precision.toString());
                assertArrayEquals(embedding, lm.model().tokenEmbedding().weight().getArray().toFloatArray(),
                        precision + ": nothing was updated");
            }
        }
    }

    @Test
    void aRunIdentityDigestsItsFieldsAndReadsBackFromJson() throws Exception {
        RunIdentity a = RunIdentity.of(Map.of("seq", "16", "data", "x"));
        assertEquals(a.id(), RunIdentity.of(Map.of("data", "x", "seq", "16")).id());
        assertFalse(a.id().equals(RunIdentity.of(Map.of("data", "x", "seq", "17")).id()));
        assertFalse(RunIdentity.of(Map.of("a", "b=c")).id().equals(RunIdentity.of(Map.of("a=b", "c")).id()));
        assertEquals(a, RunIdentity.fromJson(a.toJson(), "test"));
        assertEquals(List.of("seq: 17 in the checkpoint, 16 in this run", "x: 1 in the checkpoint, (none) in this run"),
                a.differences(RunIdentity.of(Map.of("seq", "17", "data", "x", "x", "1"))));
        assertThrows(IllegalArgumentException.class, () -> a.with(Map.of("seq", "32")));
        Files.writeString(tmp.resolve("config.json"), "{}", StandardCharsets.UTF_8);
        String before = RunIdentity.modelFingerprint(tmp);
        Files.copy(tmp.resolve("config.json"), tmp.resolve("model.safetensors"), StandardCopyOption.REPLACE_EXISTING);
        assertFalse(before.equals(RunIdentity.modelFingerprint(tmp)));
        AtomicFiles.deleteTree(tmp.resolve("model.safetensors"));
        assertEquals(before, RunIdentity.modelFingerprint(tmp));
    }

    @Test
    void allFiniteFindsEveryKindOfNonFiniteValue() {
        try (ai.djl.ndarray.NDManager m = ai.djl.ndarray.NDManager.newBaseManager()) {
            for (DataType type : new DataType[] {DataType.FLOAT32, DataType.FLOAT16}) {
                float[] values = new float[3000];
                for (int i = 0; i < values.length; i++) {
                    values[i] = (i % 7 - 3) * 1000f; // large finite values of both signs (FP16 holds them)
                }
                NDArray finite = m.create(values, new ai.djl.ndarray.types.Shape(1000, 3)).toType(type, false);
                assertTrue(ParameterUpdate.allFinite(finite), type.toString());
                for (float bad : new float[] {Float.NaN, Float.POSITIVE_INFINITY, Float.NEGATIVE_INFINITY}) {
                    float[] v = values.clone();
                    v[1777] = bad;
                    NDArray a = m.create(v, new ai.djl.ndarray.types.Shape(1000, 3)).toType(type, false);
                    assertFalse(ParameterUpdate.allFinite(a), type + " " + bad);
                }
            }
        }
    }

    /**
     * FP16 gradients that overflow are a skipped step while the scale can back off, and an error once it cannot: at
     * the minimum scale no step would ever be applied again.
     */
    @Test
    void fp16OverflowSkipsStepsUntilTheMinimumScaleThenStops() throws Exception {
        ai.djl.memopt.precision.DynamicLossScaler scaler = ai.djl.memopt.precision.DynamicLossScaler.builder()
                .optInitialScale(4e30f).optMaxScale(4e30f).optMinScale(1e30f).optBackoffFactor(0.5f).build();
        try (DeepSeekForCausalLM lm = model(1);
                FineTuner tuner = FineTuner.builder().setModel(lm).optPrecision(FineTuner.Precision.FP16)
                        .optLossScaler(scaler).build()) {
            float[] embedding = lm.model().tokenEmbedding().weight().getArray().toFloatArray();
            assertTrue(tuner.step(DATA.trainBatch(0, 4)).skipped(), "4e30: skipped");
            assertTrue(tuner.step(DATA.trainBatch(4, 4)).skipped(), "2e30: skipped");
            NonFiniteLossException e = assertThrows(NonFiniteLossException.class,
                    () -> tuner.step(DATA.trainBatch(8, 4)));
            assertTrue(e.getMessage().startsWith("step 3: the FP16 gradient of "), e.getMessage());
            assertTrue(e.getMessage().contains("overflows even at the minimum loss scale 1.0E30"), e.getMessage());
            assertEquals(2, tuner.step());
            assertArrayEquals(embedding, lm.model().tokenEmbedding().weight().getArray().toFloatArray());
        }
    }
}
