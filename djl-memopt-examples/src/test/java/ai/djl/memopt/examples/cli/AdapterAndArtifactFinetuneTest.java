package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.lora.LoraLinear;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.stream.Collectors;
import java.util.stream.IntStream;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * LoRA adapters at inference ({@code --adapter} on generate and perplexity, against transformers' logits of the PEFT
 * fixture) and QLoRA on a quantized artifact ({@code finetune --model ART}), with the refusals of both.
 */
class AdapterAndArtifactFinetuneTest {

    static final Path V3 = CliRun.FIXTURES.resolve("tiny-deepseek-v3");
    static final Path PEFT = CliRun.FIXTURES.resolve("tiny-deepseek-v3-lora");

    @TempDir static Path shared;
    @TempDir Path tmp;

    static Path artifact;
    static Path text;

    @BeforeAll
    static void setUp() throws Exception {
        Path model = CliRun.v3WithTokenizer(Files.createDirectories(shared.resolve("model")));
        artifact = shared.resolve("int4");
        CliRun q = CliRun.run("quantize", "--model", model.toString(), "--scheme", "int4", "--group-size", "32",
                "--out", artifact.toString(), "--json");
        assertEquals(0, q.exitCode, q.err);
        // words of the word-level tokenizer, in a short repeating pattern a few steps can learn
        text = shared.resolve("words.txt");
        Files.writeString(text, IntStream.range(0, 600).mapToObj(i -> "w" + (9 + 3 * (i % 5)))
                .collect(Collectors.joining(" ")));
    }

    private static JsonObject lastJson(String out) {
        String[] lines = out.strip().split("\n");
        return JsonParser.parseString(lines[lines.length - 1]).getAsJsonObject();
    }

    @Test
    void generateAndPerplexityWithTheFixtureAdapterMatchTransformers() throws Exception {
        long[][] ids = new long[2][];
        float[] last;
        double nll;
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(PEFT.resolve("reference.safetensors"))) {
            NDArray input = ref.load(m, "input_ids"); // (2, 12)
            NDArray logits = ref.load(m, "logits_with_adapter"); // (2, 12, 512)
            ids[0] = input.get(0).toLongArray();
            last = logits.get(0).get(11).toFloatArray();
            CausalLmLoss.Sum s = CausalLmLoss.sum(logits.get(0).expandDims(0), input.get(0).expandDims(0), null);
            nll = s.nll() / s.tokens();
        }
        int argmax = 0;
        for (int i = 1; i < last.length; i++) {
            argmax = last[i] > last[argmax] ? i : argmax;
        }
        StringBuilder csv = new StringBuilder();
        for (long id : ids[0]) {
            csv.append(csv.length() == 0 ? "" : ",").append(id);
        }
        CliRun g = CliRun.run("generate", "--model", V3.toString(), "--adapter", PEFT.toString(), "--prompt-ids",
                csv.toString(), "--max-new-tokens", "1", "--json");
        assertEquals(0, g.exitCode, g.err);
        assertEquals(argmax, lastJson(g.out).getAsJsonArray("output_ids").get(0).getAsInt(), g.out);

        CliRun p = CliRun.run("perplexity", "--model", V3.toString(), "--adapter", PEFT.toString(), "--token-ids",
                csv.toString());
        assertEquals(0, p.exitCode, p.err);
        assertEquals(nll, lastJson(p.out).get("loss").getAsDouble(), 1e-4, p.out);
        CliRun base = CliRun.run("perplexity", "--model", V3.toString(), "--token-ids", csv.toString());
        assertTrue(Math.abs(lastJson(base.out).get("loss").getAsDouble() - nll) > 1e-3, "the adapter matters");
    }

    @Test
    void qloraOnAQuantizedArtifactTrainsAdaptersOverItsQuantizedLayers() throws Exception {
        Path out = tmp.resolve("adapter");
        CliRun r = CliRun.run("finetune", "--model", artifact.toString(), "--data", text.toString(), "--steps", "3",
                "--batch", "2", "--seq", "16", "--lr", "1e-2", "--lora-rank", "4", "--out", out.toString(), "--json",
                "--no-progress", "--held-out", "0");
        assertEquals(0, r.exitCode, r.err);
        assertTrue(r.err.contains("over the quantized artifact's int4 layers"), r.err);
        JsonObject done = lastJson(r.out);
        assertEquals(4, done.get("lora_rank").getAsInt());
        assertTrue(Files.isRegularFile(out.resolve("adapter_model.safetensors")));
        JsonObject config = JsonParser.parseString(Files.readString(out.resolve("adapter_config.json")))
                .getAsJsonObject();
        assertEquals(artifact.toString(), config.get("base_model_name_or_path").getAsString());

        // the adapter goes back onto the artifact, over its quantized layers, and changes the logits
        long[] prompt = {1, 9, 12, 15};
        long expected;
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM plain = ModelDirectories.loadDeepSeek(artifact, m, DataType.FLOAT32);
            DeepSeekForCausalLM adapted = ModelDirectories.loadDeepSeek(artifact, m, DataType.FLOAT32, out);
            LoraLinear lora = (LoraLinear) Blocks.get(adapted, "model.layers.0.self_attn.o_proj");
            assertTrue(lora.base() instanceof QuantizedLinear, "the adapter wraps the artifact's int4 layer");
            NDArray input = m.create(prompt, new Shape(1, prompt.length));
            NDArray a = adapted.forward(new ParameterStore(m, false), new NDList(input), false).head();
            NDArray b = plain.forward(new ParameterStore(m, false), new NDList(input), false).head();
            assertTrue(a.sub(b).abs().max().getFloat() > 1e-4, "trained adapters change the output");
            expected = a.get(0).get(prompt.length - 1).argMax().getLong();
        }
        CliRun g = CliRun.run("generate", "--model", artifact.toString(), "--adapter", out.toString(),
                "--prompt-ids", "1,9,12,15", "--max-new-tokens", "1", "--json");
        assertEquals(0, g.exitCode, g.err);
        JsonArray outIds = lastJson(g.out).getAsJsonArray("output_ids");
        assertEquals(expected, outIds.get(0).getAsLong(), "the cached decoder runs the adapter too");

        // an adapter is not a model: the error says what to load
        CliRun wrong = CliRun.run("generate", "--model", out.toString(), "--prompt-ids", "1", "--max-new-tokens", "1");
        assertEquals(1, wrong.exitCode);
        assertTrue(wrong.err.startsWith("memopt generate: " + out + " is a LoRA adapter"), wrong.err);
        assertTrue(wrong.err.contains(out.resolve("merged").toString()) && wrong.err.contains("--adapter " + out)
                && wrong.err.contains("its base, per adapter_config.json, is " + artifact), wrong.err);
    }

    @Test
    void whatAnArtifactCannotDoIsRefusedInOneLineBeforeAnyWork() {
        String[][] cases = {
            {"", "is a quantized artifact: its layers train through LoRA adapters (QLoRA), so give --lora-rank R"},
            {"--lora-rank 4 --quantize-base int8", "is already quantized (int4): drop --quantize-base"},
            {"--lora-rank 4 --merge", "--merge with a quantized artifact: run the adapter on it instead"},
        };
        for (String[] c : cases) {
            Path out = tmp.resolve("x" + c[0].length());
            java.util.List<String> args = new java.util.ArrayList<>(java.util.List.of("finetune", "--model",
                    artifact.toString(), "--data", text.toString(), "--steps", "1", "--out", out.toString()));
            if (!c[0].isEmpty()) {
                args.addAll(java.util.List.of(c[0].split(" ")));
            }
            CliRun r = CliRun.run(args.toArray(new String[0]));
            assertEquals(1, r.exitCode, r.err);
            assertTrue(r.err.contains(c[1]), r.err);
            assertEquals(2, r.err.strip().split("\n").length, "one line and the Try line: " + r.err);
            assertFalse(Files.exists(out), "nothing written");
        }
    }
}
