package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraLinear;
import ai.djl.memopt.lora.PeftAdapters;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Random;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** {@code memopt finetune --lora-rank}: LoRA and QLoRA fine-tuning on the tiny V3 fixture, PEFT output, merging. */
class FinetuneLoraCommandTest {

    @TempDir static Path shared;
    @TempDir Path tmp;

    static Path modelDir;
    static Path text;

    /** The V3 fixture with the word-level tokenizer, and text over its words (w6 .. w511). */
    @BeforeAll
    static void setUp() throws Exception {
        modelDir = CliRun.v3WithTokenizer(Files.createDirectories(shared.resolve("model")));
        Random r = new Random(5);
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < 600; i++) {
            // a small repeating vocabulary, so a few steps visibly lower the loss
            sb.append('w').append(6 + (i % 7) * 3 + r.nextInt(2)).append(i % 20 == 19 ? "\n" : " ");
        }
        text = shared.resolve("words.txt");
        Files.writeString(text, sb.toString());
    }

    private static JsonObject done(String stdout) {
        String[] lines = stdout.trim().split("\n");
        return JsonParser.parseString(lines[lines.length - 1]).getAsJsonObject();
    }

    private static NDArray logits(DeepSeekForCausalLM lm, NDManager m) {
        long[] ids = new long[16];
        for (int i = 0; i < ids.length; i++) {
            ids[i] = 6 + 3 * (i % 7);
        }
        return lm.forward(new ParameterStore(m, false), new NDList(m.create(ids, new Shape(1, 16))), false).head();
    }

    private CliRun finetune(Path save, String... extra) {
        java.util.List<String> args = new java.util.ArrayList<>(java.util.List.of("finetune", "--model",
                modelDir.toString(), "--data", text.toString(), "--steps", "4", "--batch", "2", "--seq", "16", "--lr",
                "1e-2", "--save", save.toString(), "--json", "--no-progress", "--held-out", "0.2", "--lora", "4"));
        args.addAll(java.util.List.of(extra));
        return CliRun.run(args.toArray(new String[0]));
    }

    @Test
    void loraWritesAPeftAdapterAndAMergedModelThatAgree() throws Exception {
        Path save = tmp.resolve("lora");
        CliRun r = finetune(save, "--checkpoint", "all", "--merge");
        assertEquals(0, r.exitCode, r.err);
        JsonObject d = done(r.out);
        // 3 layers x (q_a 4*(64+32) + q_b 4*(32+96) + kv_a 4*(64+24) + kv_b 4*(16+128) + o 4*(64+64))
        assertEquals(3 * 4 * (96 + 128 + 88 + 144 + 128), d.get("lora_trainable_parameters").getAsLong());
        assertTrue(d.get("held_out_loss").getAsDouble() < d.get("held_out_loss_before").getAsDouble(), r.out);
        JsonObject config = JsonParser.parseString(Files.readString(save.resolve(PeftAdapters.CONFIG_FILE)))
                .getAsJsonObject();
        assertEquals(4, config.get("r").getAsInt());
        assertEquals(8, config.get("lora_alpha").getAsInt());
        assertTrue(Files.isRegularFile(save.resolve(PeftAdapters.WEIGHTS_FILE)));
        assertTrue(!Files.exists(save.resolve("model.safetensors")), "the adapter replaces the model in --save");

        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM adapted = DeepSeekLoader.load(modelDir, m, DataType.FLOAT32);
            NDArray base = logits(adapted, m);
            Lora.load(adapted, save);
            LoraLinear any = Lora.adapters(adapted).get("model.layers.1.self_attn.o_proj");
            assertTrue(any.loraB().getArray().abs().max().getFloat() > 0, "B trained away from zero");
            NDArray withAdapter = logits(adapted, m);
            DeepSeekForCausalLM merged = DeepSeekLoader.load(save.resolve("merged"), m, DataType.FLOAT32);
            float diff = withAdapter.sub(logits(merged, m)).abs().max().getFloat();
            float effect = withAdapter.sub(base).abs().max().getFloat();
            assertTrue(effect > 1e-3, "the adapter changes the model: " + effect);
            assertTrue(diff < 1e-5, "merged model vs base + adapter: " + diff);
            assertTrue(Files.isRegularFile(save.resolve("merged").resolve("tokenizer.json")));
        }
    }

    @Test
    void qloraOnAnInt8BaseTrainsAndMergesIntoAFullPrecisionModel() throws Exception {
        Path save = tmp.resolve("qlora");
        CliRun r = finetune(save, "--quantize-base", "int8", "--checkpoint", "all", "--merge");
        assertEquals(0, r.exitCode, r.err);
        JsonObject d = done(r.out);
        assertEquals("int8", d.get("quantized_base").getAsString());
        assertTrue(r.err.contains("int8 base"), r.err);
        // adapters on the frozen quantized base learn: held-out loss falls
        assertTrue(d.get("held_out_loss").getAsDouble() < d.get("held_out_loss_before").getAsDouble(), r.out);
        try (NDManager m = NDManager.newBaseManager()) {
            // merged onto the FP32 base: equals the FP32 base with the adapter
            DeepSeekForCausalLM adapted = DeepSeekLoader.load(modelDir, m, DataType.FLOAT32);
            Lora.load(adapted, save);
            DeepSeekForCausalLM merged = DeepSeekLoader.load(save.resolve("merged"), m, DataType.FLOAT32);
            float diff = logits(adapted, m).sub(logits(merged, m)).abs().max().getFloat();
            assertTrue(diff < 1e-5, "merged vs base + adapter: " + diff);
        }
    }

    /** PEFT's list: the expert names mean the routed experts; the dense MLP through --lora-target-parameters. */
    @Test
    void loraTargetsFollowPeftOnTheMoeModel() throws Exception {
        Path save = tmp.resolve("experts");
        CliRun r = finetune(save, "--lora-targets", "q_a_proj,gate_proj,up_proj,down_proj",
                "--lora-target-parameters", "mlp.gate_proj.weight", "--lora-dropout", "0.1");
        assertEquals(0, r.exitCode, r.err);
        // 3 q_a_proj, 2 MoE layers x 8 routed experts x 3 projections, the dense layer's gate_proj
        assertTrue(r.err.contains("LoRA on " + (3 + 2 * 8 * 3 + 1) + " modules"), r.err);
        JsonObject d = done(r.out);
        assertTrue(d.get("lora_save_warnings").toString().contains("lora_dropout 0.1 written as 0"), r.out);
        JsonObject config = JsonParser.parseString(Files.readString(save.resolve(PeftAdapters.CONFIG_FILE)))
                .getAsJsonObject();
        assertEquals("[\"q_a_proj\"]", config.get("target_modules").toString());
        assertEquals("[\"mlp.gate_proj.weight\",\"gate_up_proj\",\"down_proj\"]",
                config.get("target_parameters").toString());
        assertEquals(8, config.getAsJsonObject("rank_pattern").get("gate_up_proj").getAsInt(), config.toString());

        r = finetune(tmp.resolve("gate-only"), "--lora-targets", "q_a_proj,gate_proj");
        assertTrue(r.exitCode != 0 && r.err.contains("LoRA target gate_proj without up_proj"), r.err);
    }

    @Test
    void loraOptionsAreChecked() {
        CliRun r = CliRun.run("finetune", "--model", modelDir.toString(), "--data", text.toString(), "--steps", "1",
                "--save", tmp.resolve("x").toString(), "--quantize", "int8");
        assertEquals(1, r.exitCode);
        assertTrue(r.err.contains("--quantize-base is for LoRA fine-tuning: give --lora RANK"), r.err);
        r = finetune(tmp.resolve("y"), "--quantize", "int3");
        assertTrue(r.exitCode != 0 && r.err.contains("unknown --quantize 'int3'"), r.err);
        r = finetune(tmp.resolve("z"), "--lora-targets", "no_such_proj");
        assertTrue(r.exitCode != 0 && r.err.contains("no module matches LoRA target modules [no_such_proj]"), r.err);
    }

    @Test
    void resumedLoraRunEqualsAnUninterruptedOne() throws Exception {
        Path full = tmp.resolve("full");
        CliRun r = finetune(full, "--checkpoint-every", "2", "--seed", "9");
        assertEquals(0, r.exitCode, r.err);
        Path resumed = tmp.resolve("resumed");
        r = finetune(resumed, "--seed", "9", "--resume", full.resolve("checkpoints/step-00000002").toString());
        assertEquals(0, r.exitCode, r.err);
        assertTrue(r.err.contains("resumed from"), r.err);
        try (ai.djl.memopt.safetensors.SafetensorsFile a = ai.djl.memopt.safetensors.SafetensorsFile.open(
                        full.resolve(PeftAdapters.WEIGHTS_FILE));
                ai.djl.memopt.safetensors.SafetensorsFile b = ai.djl.memopt.safetensors.SafetensorsFile.open(
                        resumed.resolve(PeftAdapters.WEIGHTS_FILE))) {
            assertEquals(a.names(), b.names());
            for (String name : a.names()) {
                assertEquals(a.bytes(name), b.bytes(name), name);
            }
        }
    }
}
