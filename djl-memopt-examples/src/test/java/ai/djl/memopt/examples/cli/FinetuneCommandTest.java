package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.examples.demo.ByteLevelBpeTrainer;
import ai.djl.memopt.finetune.TextCorpus;
import ai.djl.memopt.finetune.TokenDataset;
import ai.djl.memopt.model.deepseek.DeepSeekCheckpointWriter;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.StringJoiner;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class FinetuneCommandTest {

    private static final Path SOTU = Path.of("src/main/resources/ai/djl/memopt/examples/demo/sotu");

    @TempDir static Path shared;
    @TempDir Path tmp;

    static Path modelDir;
    static Path text;

    @BeforeAll
    static void setUp() throws Exception {
        Path[] made = tinyModelAndSpeech(shared);
        modelDir = made[0];
        text = made[1];
    }

    /**
     * A tiny DeepSeek-V3 model with random weights and a 320-token byte-level BPE trained on 6000 characters of a
     * speech, in {@code dir}: returns the model directory and the text file.
     */
    static Path[] tinyModelAndSpeech(Path dir) throws Exception {
        String speech = Files.readString(SOTU.resolve("1961_john_f_kennedy_d.txt"), StandardCharsets.UTF_8);
        speech = speech.substring(0, 6000);
        Path text = dir.resolve("speech.txt");
        Files.writeString(text, speech);
        Path modelDir = dir.resolve("model");
        DeepSeekConfig config = DeepSeekConfig.builder(DeepSeekConfig.DEEPSEEK_V3).vocabSize(320).hiddenSize(32)
                .intermediateSize(64).moeIntermediateSize(16).numHiddenLayers(3).numAttentionHeads(2).qLoraRank(16)
                .kvLoraRank(16).qkNopeHeadDim(8).qkRopeHeadDim(4).vHeadDim(8).nRoutedExperts(4).nSharedExperts(1)
                .numExpertsPerTok(2).nGroup(2).topkGroup(1).firstKDenseReplace(1).maxPositionEmbeddings(128).build();
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(config, 1, Device.cpu(), DataType.FLOAT32)) {
            DeepSeekCheckpointWriter.save(lm, config, modelDir);
        }
        ByteLevelBpeTrainer.train(List.of(speech), 320).writeTo(modelDir);
        return new Path[] {modelDir, text};
    }

    /** Exit code, stdout and stderr of an in-process run ({@link CliRun}). */
    static String[] run(String... args) {
        CliRun r = CliRun.run(args);
        return new String[] {Integer.toString(r.exitCode), r.out, r.err};
    }

    private static List<JsonObject> lines(String stdout) {
        List<JsonObject> out = new ArrayList<>();
        for (String line : stdout.trim().split("\n")) {
            out.add(JsonParser.parseString(line).getAsJsonObject());
        }
        return out;
    }

    private String[] finetune(Path save, int steps, String... extra) {
        List<String> args = new ArrayList<>(List.of("finetune", "--model", modelDir.toString(), "--data",
                text.toString(), "--steps", Integer.toString(steps), "--batch", "2", "--seq", "32", "--lr", "3e-3",
                "--checkpoint", "nested", "--grad-accum", "2", "--save", save.toString(), "--json", "--held-out",
                "0.1"));
        args.addAll(List.of(extra));
        return run(args.toArray(new String[0]));
    }

    @Test
    void trainsSavesAModelPerplexityLoadsAndResumesExactly() throws Exception {
        Path save = tmp.resolve("out");
        String[] r = finetune(save, 12, "--checkpoint-every", "8");
        assertEquals("0", r[0], r[2]);
        assertTrue(r[2].contains("12/12 loss"), "progress bar on stderr: " + r[2]);
        List<JsonObject> out = lines(r[1]);
        assertEquals(13, out.size());
        JsonObject done = out.get(12);
        assertEquals("done", done.get("event").getAsString());
        double before = done.get("held_out_loss_before").getAsDouble();
        double after = done.get("held_out_loss").getAsDouble();
        assertTrue(after < before - 0.5, "held-out loss " + before + " -> " + after);
        double early = (out.get(0).get("loss").getAsDouble() + out.get(1).get("loss").getAsDouble()) / 2;
        double late = (out.get(10).get("loss").getAsDouble() + out.get(11).get("loss").getAsDouble()) / 2;
        assertTrue(late < early, "training loss " + early + " -> " + late);
        for (String f : new String[] {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}) {
            assertTrue(Files.isRegularFile(save.resolve(f)), f);
        }
        assertTrue(Files.isDirectory(save.resolve("checkpoints/step-00000008")));
        assertTrue(Files.isDirectory(save.resolve("checkpoints/step-00000012")));

        // memopt perplexity on the held-out sequences gives the loss the trainer computed in-process
        TokenDataset data = TokenDataset.tokenize(TextCorpus.read(text), modelDir.resolve("tokenizer.json"), 32, 0.1,
                42);
        assertEquals(done.get("held_out_sequences").getAsInt(), data.heldOutSequences());
        StringJoiner ids = new StringJoiner(",");
        for (long id : data.heldOutBatch(0, data.heldOutSequences()).row(0)) {
            ids.add(Long.toString(id));
        }
        for (int s = 1; s < data.heldOutSequences(); s++) {
            for (long id : data.heldOutBatch(s, s + 1).row(0)) {
                ids.add(Long.toString(id));
            }
        }
        String[] p = run("perplexity", "--model", save.toString(), "--token-ids", ids.toString(), "--seq", "32");
        assertEquals("0", p[0], p[2]);
        double loss = JsonParser.parseString(p[1].trim()).getAsJsonObject().get("loss").getAsDouble();
        assertEquals(after, loss, 1e-5 * after);

        // resuming from step 8 to 12 gives the weights of the uninterrupted run
        Path resumed = tmp.resolve("resumed");
        r = finetune(resumed, 12, "--resume", save.resolve("checkpoints/step-00000008").toString(), "--no-progress");
        assertEquals("0", r[0], r[2]);
        out = lines(r[1]);
        assertEquals(9, out.get(0).get("step").getAsInt());
        assertEquals(4, out.get(4).get("steps_run").getAsInt());
        try (SafetensorsFile a = SafetensorsFile.open(save.resolve("model.safetensors"));
                SafetensorsFile b = SafetensorsFile.open(resumed.resolve("model.safetensors"))) {
            assertEquals(a.names(), b.names());
            for (String n : a.names()) {
                assertArrayEquals(a.readFloats(n), b.readFloats(n), 1e-6f, n);
            }
        }
    }

    @Test
    void dataParallelOnTwoCpuReplicasFollowsTheSingleDeviceRun() throws Exception {
        Path single = tmp.resolve("single");
        Path parallel = tmp.resolve("parallel");
        String[] a = finetune(single, 3, "--no-progress");
        assertEquals("0", a[0], a[2]);
        String[] b = finetune(parallel, 3, "--no-progress", "--devices", "cpu,cpu");
        assertEquals("0", b[0], b[2]);
        List<JsonObject> one = lines(a[1]);
        List<JsonObject> two = lines(b[1]);
        for (int i = 0; i < 3; i++) {
            double loss = one.get(i).get("loss").getAsDouble();
            assertEquals(loss, two.get(i).get("loss").getAsDouble(), 1e-5 * loss, "step " + (i + 1));
        }
        assertEquals("[\"cpu()\",\"cpu()\"]", two.get(3).get("devices").toString());
        try (SafetensorsFile x = SafetensorsFile.open(single.resolve("model.safetensors"));
                SafetensorsFile y = SafetensorsFile.open(parallel.resolve("model.safetensors"))) {
            for (String n : x.names()) {
                assertArrayEquals(x.readFloats(n), y.readFloats(n), 1e-5f, n);
            }
        }
        // LoRA over replicas: the adapter is trained and saved (its values: DataParallelFineTunerTest)
        Path lora = tmp.resolve("lora");
        String[] adapter = finetune(lora, 2, "--no-progress", "--lora-rank", "4", "--devices", "cpu,cpu");
        assertEquals("0", adapter[0], adapter[2]);
        assertTrue(Files.isRegularFile(lora.resolve("adapter_model.safetensors")));
        String[] odd = finetune(tmp.resolve("odd"), 1, "--devices", "cpu,cpu,cpu");
        assertEquals("1", odd[0]);
        assertTrue(odd[2].contains("--batch 2 does not split evenly between the 3 --devices cpu,cpu,cpu"), odd[2]);
        String[] both = finetune(tmp.resolve("both"), 1, "--devices", "cpu,cpu", "--device", "cpu");
        assertTrue(both[2].contains("not both"), both[2]);
    }

    @Test
    void fp16TrainsOnAPreset() throws Exception {
        Path save = tmp.resolve("fp16");
        String[] r = run("finetune", "--preset", "bench-tiny", "--tokenizer", modelDir.resolve("tokenizer.json")
                .toString(), "--data", text.toString(), "--steps", "2", "--batch", "1", "--seq", "16",
                "--precision", "fp16", "--save", save.toString(), "--json", "--no-progress", "--held-out", "0");
        assertEquals("0", r[0], r[2]);
        JsonObject done = lines(r[1]).get(2);
        assertEquals("fp16", done.get("precision").getAsString());
        assertEquals(65536f, lines(r[1]).get(0).get("loss_scale").getAsFloat());
        assertTrue(Files.isRegularFile(save.resolve("model.safetensors")));
        try (SafetensorsFile f = SafetensorsFile.open(save.resolve("model.safetensors"))) {
            assertEquals("F32", f.info("model.layers.0.self_attn.o_proj.weight").dtype().toString());
        }
    }

    @Test
    void badOptionsGiveClearErrors() {
        Path save = tmp.resolve("bad");
        String[][] cases = {
            {"does not exist", "--data", tmp.resolve("missing.txt").toString()},
            {"every:N", "--checkpoint", "every:x"},
            {"bf16", "--precision", "bf16"},
            {"--batch must be at least 1", "--batch", "0"},
            {"--steps", "--steps", "0"},
        };
        for (String[] c : cases) {
            List<String> args = new ArrayList<>(List.of("finetune", "--model", modelDir.toString(), "--save",
                    save.toString(), "--steps", "1", "--data", text.toString()));
            for (int i = 1; i < c.length; i += 2) {
                int at = args.indexOf(c[i]);
                if (at >= 0) {
                    args.set(at + 1, c[i + 1]);
                } else {
                    args.add(c[i]);
                    args.add(c[i + 1]);
                }
            }
            String[] r = run(args.toArray(new String[0]));
            assertNotEquals("0", r[0], c[0]);
            assertTrue(r[2].contains(c[0]), "expected '" + c[0] + "' in: " + r[2]);
        }
        String[] r = run("finetune", "--preset", "bench-tiny", "--data", text.toString(), "--steps", "1", "--save",
                save.toString());
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("--tokenizer"), r[2]);
        r = run("finetune", "--model", modelDir.toString(), "--preset", "bench-tiny", "--data", text.toString(),
                "--steps", "1", "--save", save.toString());
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("mutually exclusive"), r[2]);
        r = run("finetune", "--model", modelDir.toString(), "--data", text.toString(), "--steps", "1", "--seq",
                "4096", "--save", save.toString());
        assertNotEquals("0", r[0]);
        assertTrue(r[2].contains("too short") || r[2].contains("max_position"), r[2]);
        assertTrue(!Files.exists(save.resolve("model.safetensors")), "nothing written on errors");
    }
}
