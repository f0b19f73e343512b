package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.List;
import java.util.Map;
import java.util.function.Consumer;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Adapters we save, on the tiny DeepSeek-V3 model, for the target sets PEFT users train: attention only; attention
 * plus the dense MLP and shared experts; routed experts (PEFT's own list); single layers with rsLoRA; and PEFT's
 * fused-expert fixture re-saved. Each must load back into the same outputs and save again into the same files. With
 * {@code MEMOPT_PEFT_CHECK_DIR} set, the adapters, our logits for the fixture's {@code input_ids}, the fixture model
 * and {@code check_peft.py} are written there, for a run of PEFT itself on a machine that has it:
 * {@code cd $MEMOPT_PEFT_CHECK_DIR && python3 check_peft.py}.
 */
class PeftCompatibilityTest {

    static final Path MODEL = DeepSeekLoraTest.MODEL;
    static final Path MLP_ADAPTER = FusedExpertsLoraTest.MLP_ADAPTER;
    static final String[] ATTN = PeftAdaptersTest.ATTN;
    static final float TOLERANCE = 1e-4f;

    @TempDir
    Path tmp;

    private static DeepSeekForCausalLM model(NDManager m) throws IOException {
        return DeepSeekLoader.load(MODEL, m, DataType.FLOAT32);
    }

    /** Every adapter gets a random B (and so a nonzero delta), drawn with {@code seed}. */
    private static void randomize(DeepSeekForCausalLM lm, NDManager m, int seed) {
        ai.djl.engine.Engine.getInstance().setRandomSeed(seed);
        for (LoraLinear l : Lora.adapters(lm).values()) {
            l.setAdapterWeights(l.loraA().getArray(),
                    m.randomNormal(0, 0.05f, l.loraB().getArray().getShape(), DataType.FLOAT32));
        }
    }

    private static byte[] bytes(Path dir, String file) throws IOException {
        return Files.readAllBytes(dir.resolve(file));
    }

    /** A case: the adapter saved to {@code out/<name>}, our logits to {@code out/<name>.npy}, listed in cases.json. */
    private static JsonObject writeCase(String name, DeepSeekForCausalLM lm, NDManager m, NDArray ids, Path out,
            List<String> expectWarnings) throws IOException {
        float[] ours = FusedExpertsLoraTest.logits(lm, m, ids).toFloatArray();
        Path dir = out.resolve(name);
        List<String> warnings = Lora.save(lm, dir, "tiny-deepseek-v3");
        assertEquals(expectWarnings.size(), warnings.size(), warnings.toString());
        for (int i = 0; i < warnings.size(); i++) {
            assertTrue(warnings.get(i).contains(expectWarnings.get(i)), warnings.get(i));
        }
        Npy.write(out.resolve(name + ".npy"), ours, new long[] {2, 12, 512});

        // load back onto a fresh model: the same outputs, on both dispatches; saved again: the same files
        DeepSeekForCausalLM back = model(m);
        Lora.load(back, dir);
        float diff = FusedExpertsLoraTest.maxAbsDiff(FusedExpertsLoraTest.logits(back, m, ids),
                m.create(ours, ids.getShape().add(512)));
        FusedExpertsLoraTest.gatherAll(back);
        float gathered = FusedExpertsLoraTest.maxAbsDiff(FusedExpertsLoraTest.logits(back, m, ids),
                m.create(ours, ids.getShape().add(512)));
        System.out.printf("PEFT case %s: %s; reloaded logits differ by %.3g (gathered dispatch %.3g)%n", name,
                Lora.adapters(lm).size() + " adapters", diff, gathered);
        assertTrue(diff < 1e-6f && gathered < 1e-5f, name + ": reloaded " + diff + ", gathered " + gathered);
        Path again = out.resolve(name + "-again");
        Lora.save(back, again, "tiny-deepseek-v3");
        assertArrayEquals(bytes(dir, PeftAdapters.WEIGHTS_FILE), bytes(again, PeftAdapters.WEIGHTS_FILE), name);
        assertEquals(Files.readString(dir.resolve(PeftAdapters.CONFIG_FILE)),
                Files.readString(again.resolve(PeftAdapters.CONFIG_FILE)), name);
        deleteTree(again);

        JsonObject c = new JsonObject();
        c.addProperty("name", name);
        c.addProperty("adapter", name);
        c.addProperty("logits", name + ".npy");
        c.addProperty("tolerance", TOLERANCE);
        JsonArray keys = new JsonArray();
        PeftWriter.peftKeys(lm).forEach(keys::add);
        c.add("peft_targets", keys);
        return c;
    }

    private static void deleteTree(Path dir) throws IOException {
        try (Stream<Path> s = Files.walk(dir)) {
            for (Path p : s.sorted(java.util.Comparator.reverseOrder()).toList()) {
                Files.delete(p);
            }
        }
    }

    private static JsonObject config(Path dir) throws IOException {
        return JsonParser.parseString(Files.readString(dir.resolve(PeftAdapters.CONFIG_FILE), StandardCharsets.UTF_8))
                .getAsJsonObject();
    }

    private JsonObject adapted(String name, LoraConfig config, int seed, Path out, NDArray ids, NDManager m,
            Consumer<JsonObject> checkConfig, String... warnings) throws IOException {
        DeepSeekForCausalLM lm = model(m);
        Lora.apply(lm, config);
        randomize(lm, m, seed);
        JsonObject c = writeCase(name, lm, m, ids, out, List.of(warnings));
        checkConfig.accept(config(out.resolve(name)));
        return c;
    }

    @Test
    void savedAdaptersRoundTripAndArePreparedForPeft() throws IOException {
        String env = System.getenv("MEMOPT_PEFT_CHECK_DIR");
        Path out = env != null ? Path.of(env) : tmp;
        Files.createDirectories(out);
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(MLP_ADAPTER.resolve("reference.safetensors"))) {
            NDArray ids = ref.load(m, "input_ids");
            JsonArray cases = new JsonArray();

            cases.add(adapted("attention", LoraConfig.builder().setRank(4).optAlpha(8).optTargetModules(ATTN).build(),
                    31, out, ids, m, c -> assertEquals(5, c.getAsJsonArray("target_modules").size())));

            // dense MLP and shared experts through parameters; a rank pattern; dropout, which PEFT refuses there
            cases.add(adapted("attention_mlp", LoraConfig.builder().setRank(4).optAlpha(8).optDropout(0.05f)
                    .optTargetModules(ATTN).optTargetParameters("gate_proj.weight", "up_proj.weight",
                            "down_proj.weight")
                    .optRankPattern(Map.of("q_b_proj", 8)).build(), 32, out, ids, m, c -> {
                        assertEquals("[\"gate_proj.weight\",\"up_proj.weight\",\"down_proj.weight\"]",
                                c.get("target_parameters").toString());
                        assertEquals("{\"q_b_proj\":8}", c.get("rank_pattern").toString());
                        assertEquals(0, c.get("lora_dropout").getAsFloat());
                    }, "lora_dropout 0.05 written as 0"));

            // PEFT's list: the routed experts, fused (block-diagonal gate_up of rank 8, alpha 16)
            cases.add(adapted("routed_experts", LoraConfig.builder().setRank(4).optAlpha(8)
                    .optTargetModules("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
                            "up_proj", "down_proj").build(), 33, out, ids, m, c -> {
                                assertEquals("[\"gate_up_proj\",\"down_proj\"]", c.get("target_parameters").toString());
                                assertEquals("{\"gate_up_proj\":8}", c.get("rank_pattern").toString());
                                assertEquals("{\"gate_up_proj\":16}", c.get("alpha_pattern").toString());
                            }));

            // single layers: whole paths; one MoE layer's down_proj alone (no nesting); rsLoRA
            cases.add(adapted("single_layers_rslora", LoraConfig.builder().setRank(2).optAlpha(3).optUseRslora(true)
                    .optTargetModules("model.layers.1.self_attn.q_a_proj")
                    .optTargetParameters("model.layers.2.mlp.experts.down_proj", "model.layers.0.mlp.up_proj.weight")
                    .build(), 34, out, ids, m, c -> assertEquals("[\"layers.1.self_attn.q_a_proj\"]",
                            c.get("target_modules").toString())));

            // routed experts PEFT's one rank per fused parameter does not describe: an expert without an up_proj
            // adapter, another whose down_proj adapter has rank 3 (same scale): zero-padded, with a warning each
            DeepSeekForCausalLM partial = model(m);
            Lora.apply(partial, LoraConfig.builder().setRank(2).optAlpha(4).optTargetModules("gate_proj", "up_proj",
                    "down_proj").build());
            replaceAdapter(partial, "model.layers.1.mlp.experts.5.up_proj", LoraLinear::base);
            replaceAdapter(partial, "model.layers.2.mlp.experts.0.down_proj",
                    old -> LoraLinear.builder().setBase(old.base()).setRank(3).optAlpha(6).build());
            randomize(partial, m, 35);
            cases.add(writeCase("experts_partial", partial, m, ids, out, List.of(
                    "'model.layers.1.mlp.experts.gate_up_proj' have ranks [0, 2]",
                    "'model.layers.2.mlp.experts.down_proj' have ranks [2, 3] (0: none): PEFT has one rank per fused "
                            + "parameter, "
                            + "so they are written as one rank-3 adapter padded with zeros")));

            // PEFT's own fused-expert adapter, loaded and saved again: the same tensors, the same logits
            DeepSeekForCausalLM lm = model(m);
            Lora.load(lm, MLP_ADAPTER);
            JsonObject resaved = writeCase("peft_fixture_resaved", lm, m, ids, out, List.of());
            try (SafetensorsFile peft = SafetensorsFile.open(MLP_ADAPTER.resolve(PeftAdapters.WEIGHTS_FILE));
                    SafetensorsFile ours = SafetensorsFile.open(out.resolve("peft_fixture_resaved")
                            .resolve(PeftAdapters.WEIGHTS_FILE))) {
                assertEquals(peft.names(), ours.names());
                for (String name : peft.names()) {
                    assertEquals(peft.bytes(name), ours.bytes(name), name);
                }
            }
            LoraConfig peftConfig = PeftAdapters.readConfig(MLP_ADAPTER);
            LoraConfig ourConfig = PeftAdapters.readConfig(out.resolve("peft_fixture_resaved"));
            for (String key : new String[] {"model.layers.1.mlp.experts.gate_up_proj",
                    "model.layers.2.mlp.experts.down_proj", "model.layers.0.self_attn.o_proj"}) {
                assertEquals(peftConfig.rankFor(key), ourConfig.rankFor(key), key);
                assertEquals(peftConfig.alphaFor(key), ourConfig.alphaFor(key), key);
            }
            Npy.write(out.resolve("peft_fixture_resaved.npy"), ref.readFloats("logits_with_adapter"),
                    new long[] {2, 12, 512});
            cases.add(resaved);

            Npy.writeLongs(out.resolve("input_ids.npy"), ids.toLongArray(), new long[] {2, 12});
            Files.writeString(out.resolve("cases.json"),
                    new GsonBuilder().setPrettyPrinting().create().toJson(cases) + "\n");
            if (env != null) {
                Path model = Files.createDirectories(out.resolve("tiny-deepseek-v3"));
                for (String f : new String[] {"config.json", "generation_config.json", "model.safetensors"}) {
                    Files.copy(MODEL.resolve(f), model.resolve(f), StandardCopyOption.REPLACE_EXISTING);
                }
                for (String f : new String[] {"check_peft.py", "README.md"}) {
                    Files.copy(Path.of("src/test/resources/peft-check").resolve(f), out.resolve(f),
                            StandardCopyOption.REPLACE_EXISTING);
                }
            }
        }
    }

    @Test
    void whatPeftCannotExpressIsRefusedBeforeWriting() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = model(m);
            Lora.apply(lm, LoraConfig.builder().setRank(4).optAlpha(8).optTargetModules("gate_proj", "up_proj")
                    .build());
            // one expert's up_proj with another scale: PEFT has one scale for the whole fused parameter
            replaceAdapter(lm, "model.layers.2.mlp.experts.6.up_proj",
                    old -> LoraLinear.builder().setBase(old.base()).setRank(4).optAlpha(4).build());
            Path dir = tmp.resolve("scales");
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> Lora.save(lm, dir));
            assertTrue(e.getMessage().contains("one LoRA scale") && e.getMessage().contains("experts.6.up_proj"),
                    e.getMessage());
            assertFalse(Files.exists(dir), "nothing written");

            // the router: PEFT turns the name 'gate' into the parameter gate.weight; no LoRA there
            e = assertThrows(IllegalArgumentException.class, () -> Lora.apply(model(m), LoraConfig.builder()
                    .setRank(2).optTargetModules("q_a_proj", "gate").build()));
            assertTrue(e.getMessage().contains("LoRA on the router is not supported"), e.getMessage());
            // a module targeted twice, as a module and through its weight: PEFT refuses that too
            e = assertThrows(IllegalArgumentException.class, () -> Lora.apply(model(m), LoraConfig.builder()
                    .setRank(2).optTargetModules("o_proj").optTargetParameters("self_attn.o_proj.weight").build()));
            assertTrue(e.getMessage().contains("targeted both by target_modules"), e.getMessage());
        }
    }

    /** Minimal NumPy {@code .npy} (format 1.0) writer for little-endian float32 and int64 arrays. */
    static final class Npy {
        private Npy() {}

        static void write(Path file, float[] values, long[] shape) throws IOException {
            ByteBuffer data = ByteBuffer.allocate(4 * values.length).order(ByteOrder.LITTLE_ENDIAN);
            data.asFloatBuffer().put(values);
            write(file, "<f4", shape, data);
        }

        static void writeLongs(Path file, long[] values, long[] shape) throws IOException {
            ByteBuffer data = ByteBuffer.allocate(8 * values.length).order(ByteOrder.LITTLE_ENDIAN);
            data.asLongBuffer().put(values);
            write(file, "<i8", shape, data);
        }

        private static void write(Path file, String descr, long[] shape, ByteBuffer data) throws IOException {
            StringBuilder dims = new StringBuilder();
            for (long d : shape) {
                dims.append(d).append(", ");
            }
            StringBuilder header = new StringBuilder("{'descr': '" + descr + "', 'fortran_order': False, 'shape': ("
                    + dims.toString().trim().replaceAll(",$", shape.length == 1 ? "," : "") + "), }");
            while ((10 + header.length() + 1) % 64 != 0) {
                header.append(' ');
            }
            header.append('\n');
            byte[] h = header.toString().getBytes(StandardCharsets.US_ASCII);
            ByteBuffer out = ByteBuffer.allocate(10 + h.length + data.capacity()).order(ByteOrder.LITTLE_ENDIAN);
            out.put((byte) 0x93).put("NUMPY".getBytes(StandardCharsets.US_ASCII)).put((byte) 1).put((byte) 0);
            out.putShort((short) h.length).put(h).put(data.array());
            Files.write(file, out.array());
        }
    }

    /** Replaces the adapter at {@code path} itself ({@code BlockTrees.replace} would hand over the projection inside it). */
    private static void replaceAdapter(ai.djl.nn.Block root, String path,
            java.util.function.Function<LoraLinear, ai.djl.nn.Block> replacement) {
        int dot = path.lastIndexOf('.');
        LoraLinear old = (LoraLinear) ai.djl.memopt.nn.BlockTrees.get(root, path);
        ai.djl.memopt.nn.BlockTrees.replaceChild(ai.djl.memopt.nn.BlockTrees.get(root, path.substring(0, dot)),
                path.substring(dot + 1), replacement.apply(old));
    }
}
