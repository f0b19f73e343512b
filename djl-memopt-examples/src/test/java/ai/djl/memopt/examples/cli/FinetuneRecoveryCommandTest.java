package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.finetune.CheckpointDirectory;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.SafetensorsFile;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Pattern;
import java.util.stream.Stream;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/**
 * What {@code memopt finetune} leaves after a crash, a resume, a run of other settings or a corrupt checkpoint. Runs
 * that may crash run in a forked JVM ({@link ForkedCli}): a native crash or a crash point fails the test, not the
 * suite.
 */
class FinetuneRecoveryCommandTest {

    @TempDir static Path shared;
    @TempDir Path tmp;

    static Path modelDir;
    static Path text;
    /** A model trained 4 steps (checkpoints at 2 and 4), and one trained 8 steps without interruption. */
    static Path four;
    static Path eight;

    @BeforeAll
    static void setUp() throws Exception {
        Path[] made = FinetuneCommandTest.tinyModelAndSpeech(shared);
        modelDir = made[0];
        text = made[1];
        four = shared.resolve("four");
        eight = shared.resolve("eight");
        assertOk(CliRun.run(args(four, 4)));
        assertOk(CliRun.run(args(eight, 8)));
    }

    /**
     * {@code finetune} of the tiny model for {@code steps} steps into {@code save}, a checkpoint every 2 steps;
     * {@code extra} options replace these or are added.
     */
    static String[] args(Path save, int steps, String... extra) {
        List<String> a = new ArrayList<>(List.of("finetune", "--model", modelDir.toString(), "--data",
                text.toString(), "--steps", Integer.toString(steps), "--batch", "2", "--seq", "32", "--lr", "3e-3",
                "--held-out", "0.1", "--checkpoint-every", "2", "--out", save.toString(), "--no-progress"));
        for (int i = 0; i < extra.length; i++) {
            boolean valued = i + 1 < extra.length && !extra[i + 1].startsWith("--");
            int at = a.indexOf(extra[i]);
            if (valued && at >= 0) {
                a.set(at + 1, extra[++i]);
            } else {
                a.add(extra[i]);
                if (valued) {
                    a.add(extra[++i]);
                }
            }
        }
        return a.toArray(new String[0]);
    }

    private static void assertOk(CliRun r) {
        assertEquals(0, r.exitCode, r.err);
    }

    private static void copyTree(Path from, Path to) throws IOException {
        try (Stream<Path> s = Files.walk(from)) {
            for (Path p : (Iterable<Path>) s::iterator) {
                Path t = to.resolve(from.relativize(p).toString());
                if (Files.isDirectory(p)) {
                    Files.createDirectories(t);
                } else {
                    Files.copy(p, t);
                }
            }
        }
    }

    private static boolean sameFile(Path a, Path b) throws IOException {
        return Files.mismatch(a, b) == -1;
    }

    private static List<String> names(Path dir) throws IOException {
        try (Stream<Path> s = Files.list(dir)) {
            return s.map(p -> p.getFileName().toString()).sorted().toList();
        }
    }

    /**
     * The resume of the issue: from step 8 to 16 with a checkpoint every 4 steps crashed the JVM (a heap corrupted
     * by optimizer state restored into memory the garbage collector freed). Forked, it must end normally with the
     * weights of the uninterrupted run, bit for bit.
     */
    @Test
    void resumingAcrossCheckpointsMatchesTheUninterruptedRunBitForBit() throws Exception {
        Path base = tmp.resolve("base");
        assertOk(CliRun.run(args(base, 12, "--checkpoint-every", "4")));
        Path resumed = tmp.resolve("resumed");
        copyTree(base.resolve("checkpoints/step-00000008"), resumed.resolve("checkpoints/step-00000008"));
        ForkedCli.Result r = ForkedCli.run(tmp, List.of(), List.of(args(resumed, 16, "--checkpoint-every", "4",
                "--resume", resumed.resolve("checkpoints").toString())));
        assertEquals(0, r.exitCode(), r.output());
        assertTrue(r.output().contains("resumed from " + resumed.resolve("checkpoints/step-00000008") + " at step 8"),
                r.output());
        Path straight = tmp.resolve("straight");
        assertOk(CliRun.run(args(straight, 16, "--checkpoint-every", "4")));
        assertTrue(sameFile(straight.resolve("model.safetensors"), resumed.resolve("model.safetensors")),
                "resumed weights differ from the uninterrupted run's");
        assertEquals(List.of("step-00000012", "step-00000016"), names(resumed.resolve("checkpoints")));
    }

    /**
     * A kill at each write step of checkpointing and of the final save leaves the old model or the new one, complete,
     * and only complete checkpoints; running the same command again then finishes with the uninterrupted run's model.
     */
    @ParameterizedTest
    @ValueSource(strings = {
        "checkpoint.weights-written", "checkpoint.optimizer-written", "checkpoint.state-written",
        "checkpoint.manifest-written", "replace-directory.written", "replace-directory.ready",
        "checkpoint.prune-renamed", "checkpoint.pruned", "checkpoint.manifest-written#2",
        "finetune-save.model-written", "finetune-save.checkpoints-carried", "replace-directory.written#3",
        "replace-directory.ready#3", "replace-directory.swapped", "replace-directory.moved-aside"
    })
    void aKillAtEveryWriteStepLeavesTheOldOrTheNewModelComplete(String point) throws Exception {
        Path save = tmp.resolve("save");
        copyTree(four, save);
        String[] again = args(save, 8, "--resume", save.resolve("checkpoints").toString());
        ForkedCli.Result r = ForkedCli.run(tmp, List.of("-Dmemopt.crashAt=" + point,
                "-Dmemopt.noRenameExchange=" + point.endsWith("moved-aside")), List.of(again));
        assertEquals(137, r.exitCode(), r.output());
        assertTrue(r.output().contains("crash point " + point.replaceAll("#.*", "") + " reached"), r.output());

        assertTrue(AtomicFiles.recoverDirectory(save), "what the next run finds first");
        boolean old = sameFile(four.resolve("model.safetensors"), save.resolve("model.safetensors"));
        assertTrue(old || sameFile(eight.resolve("model.safetensors"), save.resolve("model.safetensors")),
                point + ": the model is neither the old nor the new one");
        for (String f : new String[] {"config.json", "tokenizer.json", "tokenizer_config.json"}) {
            assertTrue(sameFile(four.resolve(f), save.resolve(f)), f);
        }
        Path checkpoints = save.resolve("checkpoints");
        CheckpointDirectory.recover(checkpoints);
        for (String name : names(checkpoints)) {
            assertTrue(Pattern.matches("step-0000000[2468]", name), point + " left " + names(checkpoints));
            CheckpointDirectory.verify(checkpoints.resolve(name));
        }

        CliRun done = CliRun.run(again);
        assertOk(done);
        assertTrue(sameFile(eight.resolve("model.safetensors"), save.resolve("model.safetensors")), point
                + ": the run after the crash does not end with the uninterrupted run's model");
        assertEquals(List.of("step-00000006", "step-00000008"), names(checkpoints));
        assertEquals(List.of("checkpoints", "config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"), names(save));
        assertEquals(List.of("save"), names(tmp).stream().filter(n -> n.contains("save")).toList(),
                "no leftovers beside --save");
    }

    /** The same with LoRA and {@code --merge}: the merged model is part of the output that is replaced as a whole. */
    @Test
    void aKillWhileMergingLeavesTheOldAdapterAndMergedModel() throws Exception {
        Path save = tmp.resolve("lora");
        String[] lora = {"--lora-rank", "4", "--merge"};
        assertOk(CliRun.run(args(save, 2, lora)));
        Path before = tmp.resolve("before");
        copyTree(save, before);
        List<String> again = new ArrayList<>(List.of(args(save, 4, lora)));
        again.addAll(List.of("--resume", save.resolve("checkpoints").toString()));
        ForkedCli.Result r = ForkedCli.run(tmp, List.of("-Dmemopt.crashAt=finetune-save.merged-written"), again);
        assertEquals(137, r.exitCode(), r.output());
        assertTrue(AtomicFiles.recoverDirectory(save));
        for (String f : new String[] {"adapter_model.safetensors", "adapter_config.json", "merged/model.safetensors",
            "merged/config.json"}) {
            assertTrue(sameFile(before.resolve(f), save.resolve(f)), f + " is not the old one");
        }
        assertOk(CliRun.run(again.toArray(new String[0])));
        assertFalse(sameFile(before.resolve("merged/model.safetensors"), save.resolve("merged/model.safetensors")));
        assertFalse(sameFile(before.resolve("adapter_model.safetensors"), save.resolve("adapter_model.safetensors")));
    }

    /**
     * A run saving where an earlier run with other settings left checkpoints of higher steps keeps its own
     * checkpoints (the earlier run's are kept too), and resumes from its own, saying that it passed the others over.
     */
    @Test
    void aRunKeepsAndResumesOnlyItsOwnCheckpoints() throws Exception {
        Path save = tmp.resolve("save");
        copyTree(eight, save); // checkpoints 6 and 8 of a run with --seq 32
        CliRun r = CliRun.run(args(save, 4, "--seq", "16"));
        assertOk(r);
        assertTrue(r.err.contains("holds 2 checkpoint(s) of other runs"), r.err);
        assertEquals(List.of("step-00000002", "step-00000004", "step-00000006", "step-00000008"),
                names(save.resolve("checkpoints")));
        r = CliRun.run(args(save, 6, "--seq", "16", "--resume", save.resolve("checkpoints").toString()));
        assertOk(r);
        assertTrue(r.err.contains("resumed from " + save.resolve("checkpoints/step-00000004") + " at step 4"), r.err);
        assertTrue(r.err.contains("checkpoint(s) of other runs (step-00000008, ...), left alone and passed over"),
                r.err);
        // this run's step 6 took the place of the other run's; its 8 is kept
        assertTrue(r.err.contains("replacing " + save.resolve("checkpoints/step-00000006") + ", a checkpoint of"
                + " another run"), r.err);
        assertEquals(List.of("step-00000004", "step-00000006", "step-00000008"), names(save.resolve("checkpoints")));
        // a run that matches none of them says what differs
        r = CliRun.run(args(tmp.resolve("other"), 6, "--seq", "24", "--resume", save.resolve("checkpoints")
                .toString()));
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("none written by this run") && r.err.contains("seq: 32 in the checkpoint, 24 in"
                + " this run"), r.err);
        assertFalse(Files.exists(tmp.resolve("other/model.safetensors")));
    }

    @Test
    void aFlippedBitInACheckpointWeightIsRefusedOnResume() throws Exception {
        Path save = tmp.resolve("save");
        copyTree(four, save);
        Path weights = save.resolve("checkpoints/step-00000004/model.safetensors");
        long at;
        try (SafetensorsFile f = SafetensorsFile.open(weights)) {
            at = f.info("model.layers.0.self_attn.o_proj.weight").fileOffset() + 5;
        }
        try (FileChannel ch = FileChannel.open(weights, StandardOpenOption.READ, StandardOpenOption.WRITE)) {
            ByteBuffer b = ByteBuffer.allocate(1);
            ch.read(b, at);
            b.put(0, (byte) (b.get(0) ^ 0x10));
            ch.write(b.rewind(), at);
        }
        CliRun r = CliRun.run(args(save, 8, "--resume", save.resolve("checkpoints").toString()));
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("step-00000004: model.safetensors is corrupt"), r.err);
        assertTrue(sameFile(four.resolve("model.safetensors"), save.resolve("model.safetensors")), "model untouched");
    }

    /** Training that diverges stops with an error naming the step, and stdout stays valid JSON (no bare NaN). */
    @Test
    void aNonFiniteLossFailsTheRunAndTheJsonStaysValid() throws Exception {
        Path save = tmp.resolve("save");
        CliRun r = CliRun.run(args(save, 6, "--optimizer", "sgd", "--lr", "1e30", "--json"));
        assertNotEquals(0, r.exitCode, r.out);
        assertTrue(Pattern.compile("step [2-6]: the (loss is (NaN|-?Infinity)|gradient of .* holds NaN)")
                .matcher(r.err).find(), r.err);
        JsonObject last = null;
        for (String line : r.out.trim().split("\n")) {
            assertFalse(Pattern.compile("[:\\[,]\\s*-?(NaN|Infinity)").matcher(line).find(), "invalid JSON: " + line);
            last = JsonParser.parseString(line).getAsJsonObject();
        }
        assertEquals("error", last.get("event").getAsString(), r.out);
        assertFalse(Files.exists(save.resolve("model.safetensors")), "no model from a failed run");
    }

    @Test
    void aSaveDirectoryThatIsNotAnOutputIsRefused() throws Exception {
        Path save = Files.createDirectories(tmp.resolve("notes"));
        Files.writeString(save.resolve("todo.txt"), "keep me");
        CliRun r = CliRun.run(args(save, 2));
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("replaces the --out directory as a whole"), r.err);
        assertEquals(List.of("todo.txt"), names(save));
        r = CliRun.run(args(shared, 2)); // holds the model and the text
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("holds the input"), r.err);
    }
}
