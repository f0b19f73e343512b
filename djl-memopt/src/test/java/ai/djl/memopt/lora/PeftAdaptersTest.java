package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.engine.Engine;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.function.Consumer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class PeftAdaptersTest {

    static final Path FIXTURE = Path.of("src/test/resources/fixtures/tiny-deepseek-v3-lora");
    static final String[] ATTN = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"};

    @TempDir
    Path tmp;

    private static NDArray forward(Block block, NDManager m, NDArray x) {
        return block.forward(new ParameterStore(m, false), new NDList(x), false).singletonOrThrow();
    }

    private static JsonObject json(Path file) throws IOException {
        return JsonParser.parseString(Files.readString(file, StandardCharsets.UTF_8)).getAsJsonObject();
    }

    private static Set<String> strings(JsonElement array) {
        Set<String> out = new TreeSet<>();
        for (JsonElement e : array.getAsJsonArray()) {
            out.add(e.getAsString());
        }
        return out;
    }

    /** A copy of the fixture adapter whose adapter_config.json is edited. */
    private Path fixtureWithConfig(String name, Consumer<JsonObject> edit) throws IOException {
        Path dir = Files.createDirectories(tmp.resolve(name));
        Files.copy(FIXTURE.resolve(PeftAdapters.WEIGHTS_FILE), dir.resolve(PeftAdapters.WEIGHTS_FILE),
                StandardCopyOption.REPLACE_EXISTING);
        JsonObject config = json(FIXTURE.resolve(PeftAdapters.CONFIG_FILE));
        edit.accept(config);
        Files.writeString(dir.resolve(PeftAdapters.CONFIG_FILE), config.toString());
        return dir;
    }

    @Test
    void fixtureAdapterLoadsOntoAMatchingTreeWithPeftSemantics() throws IOException {
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile file = SafetensorsFile.open(FIXTURE.resolve(PeftAdapters.WEIGHTS_FILE))) {
            Engine.getInstance().setRandomSeed(11);
            Block model = ToyBlocks.deepSeekLike(m, 3);
            LoraReport report = Lora.load(model, FIXTURE);

            List<String> expected = new ArrayList<>();
            long numel = 0;
            for (int i = 0; i < 3; i++) {
                for (String p : ATTN) {
                    expected.add("model.layers." + i + ".self_attn." + p);
                }
            }
            for (String name : file.names()) {
                numel += file.info(name).numel();
            }
            assertEquals(expected, report.wrappedPaths());
            assertEquals(numel, report.trainableParameters());
            assertEquals(numel, Lora.trainableParameterCount(model));

            for (Map.Entry<String, LoraLinear> e : Lora.adapters(model).entrySet()) {
                LoraLinear l = e.getValue();
                assertEquals(2f, l.scale(), "alpha 8 / r 4");
                String prefix = PeftAdapters.PREFIX + e.getKey();
                assertArrayEquals(file.readFloats(prefix + ".lora_A.weight"), l.loraA().getArray().toFloatArray(), 0f);
                assertArrayEquals(file.readFloats(prefix + ".lora_B.weight"), l.loraB().getArray().toFloatArray(), 0f);
            }
            // the adapted projection computes x W^T + 2 (x A^T) B^T with the file's A and B
            LoraLinear kvb = Lora.adapters(model).get("model.layers.1.self_attn.kv_b_proj");
            String p = PeftAdapters.PREFIX + "model.layers.1.self_attn.kv_b_proj";
            NDArray a = m.create(file.readFloats(p + ".lora_A.weight"), new Shape(4, 16));
            NDArray b = m.create(file.readFloats(p + ".lora_B.weight"), new Shape(128, 4));
            NDArray w = ((Linear) kvb.base()).getParameters().get("weight").getArray();
            NDArray x = m.randomNormal(new Shape(2, 5, 16));
            NDArray want = x.matMul(w.transpose()).add(x.matMul(a.transpose()).matMul(b.transpose()).mul(2f));
            NDArray got = forward(kvb, m, x);
            assertTrue(want.sub(got).abs().max().getFloat() < 1e-5f);
            // nothing but the attention projections changed: MLPs, experts and lm_head are as they were
            assertTrue(BlockTrees.get(model, "lm_head") instanceof Linear);
            assertTrue(BlockTrees.get(model, "model.layers.0.mlp.gate_proj") instanceof Linear);
        }
    }

    @Test
    void savedAdapterReproducesPeftFilesTensorForTensor() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Block model = ToyBlocks.deepSeekLike(m, 3);
            Lora.load(model, FIXTURE);
            Path out = tmp.resolve("resaved");
            Lora.save(model, out, "base");
            try (SafetensorsFile ours = SafetensorsFile.open(out.resolve(PeftAdapters.WEIGHTS_FILE));
                    SafetensorsFile peft = SafetensorsFile.open(FIXTURE.resolve(PeftAdapters.WEIGHTS_FILE))) {
                assertEquals(peft.names(), ours.names());
                assertEquals(peft.metadata(), ours.metadata());
                for (String name : peft.names()) {
                    assertEquals(peft.info(name).dtype(), ours.info(name).dtype(), name);
                    assertArrayEquals(peft.info(name).shape(), ours.info(name).shape(), name);
                    assertEquals(peft.bytes(name), ours.bytes(name), name);
                }
            }
            JsonObject ours = json(out.resolve(PeftAdapters.CONFIG_FILE));
            JsonObject peft = json(FIXTURE.resolve(PeftAdapters.CONFIG_FILE));
            for (String key : new String[] {"peft_type", "r", "lora_alpha", "bias", "task_type", "fan_in_fan_out",
                    "use_rslora", "use_dora", "base_model_name_or_path", "lora_dropout", "modules_to_save",
                    "layers_to_transform", "rank_pattern", "alpha_pattern", "inference_mode"}) {
                assertEquals(peft.get(key), ours.get(key), key);
            }
            assertEquals(strings(peft.get("target_modules")), strings(ours.get("target_modules")));
            assertTrue(ours.get("exclude_modules").isJsonNull());
            // and it reads back as the same config
            LoraConfig back = PeftAdapters.readConfig(out);
            assertEquals(PeftAdapters.readConfig(FIXTURE).toBuilder().optTargetModules(back.targetModules()).build(),
                    back);
        }
    }

    private static void copyBaseWeights(Block from, Block to) {
        Map<String, Parameter> src = BlockTrees.parameters(from);
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(to).entrySet()) {
            e.getValue().getArray().intern(src.get(e.getKey()).getArray().duplicate());
        }
    }

    @Test
    void savedAdaptersLoadBackToIdenticalOutputs() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Engine.getInstance().setRandomSeed(12);
            SequentialBlock trained = ToyBlocks.mlp(m, 16, 32, 8, DataType.FLOAT32);
            SequentialBlock fresh = ToyBlocks.mlp(m, 16, 32, 8, DataType.FLOAT32);
            copyBaseWeights(trained, fresh);
            Lora.apply(trained, LoraConfig.builder().setRank(3).optAlpha(5).optUseRslora(true)
                    .optTargetModules("0", "2").build());
            for (LoraLinear l : Lora.adapters(trained).values()) {
                l.setAdapterWeights(l.loraA().getArray(),
                        m.randomNormal(0, 0.3f, l.loraB().getArray().getShape(), DataType.FLOAT32));
            }
            NDArray x = m.randomNormal(new Shape(4, 16));
            float[] want = forward(trained, m, x).toFloatArray();
            assertFalse(java.util.Arrays.equals(want, forward(fresh, m, x).toFloatArray()));

            Lora.save(trained, tmp);
            JsonObject config = json(tmp.resolve(PeftAdapters.CONFIG_FILE));
            assertEquals(Set.of("0", "2"), strings(config.get("target_modules")));
            assertTrue(config.get("use_rslora").getAsBoolean());
            LoraReport report = Lora.load(fresh, tmp);
            assertEquals(List.of("0", "2"), report.wrappedPaths());
            assertEquals((float) (5 / Math.sqrt(3)), ((LoraLinear) BlockTrees.get(fresh, "0")).scale(), 1e-7f);
            assertArrayEquals(want, forward(fresh, m, x).toFloatArray(), 0f);

            // loading again onto the adapted model overwrites the adapter weights in place
            ((LoraLinear) BlockTrees.get(fresh, "2")).setAdapterWeights(
                    ((LoraLinear) BlockTrees.get(fresh, "2")).loraA().getArray(), m.zeros(new Shape(8, 3)));
            Lora.load(fresh, tmp);
            assertArrayEquals(want, forward(fresh, m, x).toFloatArray(), 0f);
        }
    }

    @Test
    void targetsAreWrittenSoPeftSelectsExactlyTheAdaptedModules() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            // the dense MLP and the shared experts: parameter targets, which PEFT does not rewrite
            Block model = ToyBlocks.deepSeekLike(m, 2);
            List<String> wrapped = Lora.apply(model, LoraConfig.builder().setRank(2)
                    .optTargetParameters("gate_proj.weight").build()).wrappedPaths();
            assertEquals(List.of("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.gate_proj"),
                    wrapped);
            Path dir = tmp.resolve("dense");
            assertEquals(List.of(), Lora.save(model, dir));
            JsonObject config = json(dir.resolve(PeftAdapters.CONFIG_FILE));
            assertEquals(Set.of(), strings(config.get("target_modules")));
            assertEquals(Set.of("gate_proj.weight"), strings(config.get("target_parameters")));
            assertTrue(config.get("exclude_modules").isJsonNull());
            try (SafetensorsFile f = SafetensorsFile.open(dir.resolve(PeftAdapters.WEIGHTS_FILE))) {
                assertTrue(f.contains(PeftAdapters.PREFIX + "model.layers.0.mlp.gate_proj.lora_A.weight"), "as a module");
            }
            assertEquals(wrapped, Lora.load(ToyBlocks.deepSeekLike(m, 2), dir).wrappedPaths());

            // one layer's projection: its whole path, which PEFT matches exactly (a regex would not survive: on a MoE
            // model PEFT turns a regex into the last components of what it matches, i.e. every layer's q_a_proj)
            Block one = ToyBlocks.deepSeekLike(m, 2);
            Lora.apply(one, LoraConfig.builder().setRank(2).optTargetModules("model.layers.1.self_attn.q_a_proj")
                    .build());
            Path dir2 = tmp.resolve("one");
            Lora.save(one, dir2);
            assertEquals(Set.of("layers.1.self_attn.q_a_proj"),
                    strings(json(dir2.resolve(PeftAdapters.CONFIG_FILE)).get("target_modules")));
            assertEquals(List.of("model.layers.1.self_attn.q_a_proj"),
                    Lora.load(ToyBlocks.deepSeekLike(m, 2), dir2).wrappedPaths());
            assertEquals(List.of("model.layers.0.self_attn.q_a_proj", "model.layers.1.self_attn.q_a_proj"),
                    Lora.targets(ToyBlocks.deepSeekLike(m, 2), LoraConfig.builder().setRank(2)
                            .optTargetRegex("model\\.layers\\.1\\..*q_a_proj").build()), "PEFT's regex rewriting");
            // without routed experts a regex keeps its meaning
            assertEquals(List.of("2"), Lora.targets(ToyBlocks.mlp(m, 4, 8, 2, DataType.FLOAT32),
                    LoraConfig.builder().setRank(2).optTargetRegex("[2]").build()));
        }
    }

    @Test
    void expertNamesInTargetModulesMeanTheRoutedExpertsAsInPeft() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Block model = ToyBlocks.deepSeekLike(m, 2); // layer 1: routed experts 0 and 1, shared experts
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> Lora.apply(model,
                    LoraConfig.builder().setRank(2).optTargetModules("q_a_proj", "gate_proj").build()));
            assertTrue(e.getMessage().contains("LoRA target gate_proj without up_proj"), e.getMessage());
            assertTrue(Lora.adapters(model).isEmpty());

            // a path ending in up_proj is rewritten too: PEFT keeps only the name of the fused parameter
            List<String> wrapped = Lora.apply(model, LoraConfig.builder().setRank(2).optAlpha(4)
                    .optTargetModules("q_a_proj", "gate_proj", "shared_experts.up_proj").build()).wrappedPaths();
            assertEquals(List.of("model.layers.0.self_attn.q_a_proj", "model.layers.1.self_attn.q_a_proj",
                    "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.0.up_proj",
                    "model.layers.1.mlp.experts.1.gate_proj", "model.layers.1.mlp.experts.1.up_proj"), wrapped);
            Path dir = tmp.resolve("experts");
            Lora.save(model, dir);
            JsonObject config = json(dir.resolve(PeftAdapters.CONFIG_FILE));
            assertEquals(Set.of("q_a_proj"), strings(config.get("target_modules")));
            assertEquals(2, config.get("r").getAsInt());
            assertEquals(Set.of("gate_up_proj"), strings(config.get("target_parameters")));
            // separate rank-2 gate and up adapters: PEFT's block-diagonal rank 4, alpha doubled (same scale)
            assertEquals(4, config.getAsJsonObject("rank_pattern").get("gate_up_proj").getAsInt(), config.toString());
            assertEquals(8, config.getAsJsonObject("alpha_pattern").get("gate_up_proj").getAsInt(), config.toString());
            try (SafetensorsFile f = SafetensorsFile.open(dir.resolve(PeftAdapters.WEIGHTS_FILE))) {
                String prefix = PeftAdapters.PREFIX + "model.layers.1.mlp.experts.";
                assertTrue(f.names().containsAll(Set.of(prefix + "lora_A.weight", prefix + "lora_B.weight")));
                assertEquals(2 + 4, f.names().size());
                assertArrayEquals(new long[] {2 * 4, 64}, f.info(prefix + "lora_A.weight").shape());
                assertArrayEquals(new long[] {32 + 32, 4 * 2}, f.info(prefix + "lora_B.weight").shape());
            }
            assertEquals(wrapped, Lora.load(ToyBlocks.deepSeekLike(m, 2), dir).wrappedPaths());
        }
    }

    @Test
    void mismatchesAreRefusedNamingTheTensorAndLeaveTheModelUntouched() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            // rank in the config differs from the tensors
            Path r8 = fixtureWithConfig("r8", c -> c.addProperty("r", 8));
            Block model = ToyBlocks.deepSeekLike(m, 3);
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> Lora.load(model, r8));
            assertTrue(e.getMessage().contains(
                    "'base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight' has shape [4, 64], "
                            + "expected [8, 64] (rank 4 in the tensor, r=8 in adapter_config.json for "
                            + "'model.layers.0.self_attn.q_a_proj')"), e.getMessage());
            assertTrue(Lora.adapters(model).isEmpty(), "validation happens before wrapping");
            assertTrue(BlockTrees.parameters(model).values().stream().allMatch(Parameter::requiresGradient),
                    "nothing frozen either");

            // the model lacks a layer the adapter has
            e = assertThrows(IllegalArgumentException.class, () -> Lora.load(ToyBlocks.deepSeekLike(m, 2), FIXTURE));
            assertTrue(e.getMessage().contains("'base_model.model.model.layers.2.self_attn.kv_a_proj_with_mqa"
                    + ".lora_A.weight' does not fit the model: the model has no module"), e.getMessage());

            // the config targets a module the file has no tensors for
            Path more = fixtureWithConfig("more", c -> c.getAsJsonArray("target_modules").add("lm_head"));
            e = assertThrows(IllegalArgumentException.class, () -> Lora.load(ToyBlocks.deepSeekLike(m, 3), more));
            assertTrue(e.getMessage().contains("no tensor 'base_model.model.lm_head.lora_A.weight'"), e.getMessage());
            Path experts = fixtureWithConfig("experts", c -> c.add("target_parameters", new JsonArray()));
            Files.writeString(experts.resolve(PeftAdapters.CONFIG_FILE), json(experts.resolve(PeftAdapters.CONFIG_FILE))
                    .toString().replace("\"target_parameters\":[]", "\"target_parameters\":[\"down_proj\"]"));
            e = assertThrows(IllegalArgumentException.class, () -> Lora.load(ToyBlocks.deepSeekLike(m, 3), experts));
            assertTrue(e.getMessage().contains("no tensor 'base_model.model.model.layers.2.mlp.experts.lora_A.weight'"
                    + " for the fused routed-expert parameter 'model.layers.2.mlp.experts.down_proj'"), e.getMessage());

            // the model's projection has other dimensions
            Block narrow = ToyBlocks.deepSeekLike(m, 3);
            BlockTrees.replace(narrow, "model.layers.0.self_attn.o_proj", old -> ToyBlocks.linear(m, 48, 64,
                    DataType.FLOAT32));
            e = assertThrows(IllegalArgumentException.class, () -> Lora.load(narrow, FIXTURE));
            assertTrue(e.getMessage().contains("o_proj.lora_A.weight' has shape [4, 64], expected [4, 48]"),
                    e.getMessage());

            // features this package does not implement are refused by name
            Path dora = fixtureWithConfig("dora", c -> c.addProperty("use_dora", true));
            e = assertThrows(IllegalArgumentException.class, () -> Lora.load(ToyBlocks.deepSeekLike(m, 3), dora));
            assertTrue(e.getMessage().contains("use_dora = true: DoRA is not supported"), e.getMessage());
            Path pattern = fixtureWithConfig("pattern", c -> {
                JsonObject rp = new JsonObject();
                rp.addProperty("o_proj", 8);
                c.add("rank_pattern", rp);
            });
            e = assertThrows(IllegalArgumentException.class, () -> Lora.load(ToyBlocks.deepSeekLike(m, 3), pattern));
            assertTrue(e.getMessage().contains("o_proj.lora_A.weight' has shape [4, 64], expected [8, 64] (rank 4 in "
                    + "the tensor, r=8 in adapter_config.json for 'model.layers.0.self_attn.o_proj')"), e.getMessage());
            Path layers = fixtureWithConfig("layers", c -> c.addProperty("layers_pattern", "layers"));
            e = assertThrows(IllegalArgumentException.class, () -> Lora.load(ToyBlocks.deepSeekLike(m, 3), layers));
            assertTrue(e.getMessage().contains("layers_pattern = \"layers\" is not supported"), e.getMessage());
            Path notLora = fixtureWithConfig("ia3", c -> c.addProperty("peft_type", "IA3"));
            e = assertThrows(IllegalArgumentException.class, () -> Lora.load(ToyBlocks.deepSeekLike(m, 3), notLora));
            assertTrue(e.getMessage().contains("peft_type is 'IA3', expected 'LORA'"), e.getMessage());

            // an existing adapter of another rank
            Block adapted = ToyBlocks.deepSeekLike(m, 3);
            Lora.apply(adapted, LoraConfig.builder().setRank(8).optTargetModules(ATTN).build());
            e = assertThrows(IllegalArgumentException.class, () -> Lora.load(adapted, FIXTURE));
            assertTrue(e.getMessage().contains("has r=4") && e.getMessage().contains("r=8"), e.getMessage());

            assertThrows(java.nio.file.NoSuchFileException.class,
                    () -> Lora.load(ToyBlocks.deepSeekLike(m, 3), tmp.resolve("nowhere")));
        }
    }

    @Test
    void foreignTensorNamesAreRefused() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Path dir = fixtureWithConfig("embedding", c -> { });
            ByteBuffer data = ByteBuffer.allocate(4 * 4 * 8);
            new SafetensorsWriter()
                    .add("base_model.model.model.embed_tokens.lora_embedding_A", ai.djl.memopt.safetensors
                            .SafetensorsDType.F32, new long[] {4, 8}, data)
                    .write(dir.resolve(PeftAdapters.WEIGHTS_FILE));
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> Lora.load(ToyBlocks.deepSeekLike(m, 3), dir));
            assertTrue(e.getMessage().contains("tensor 'base_model.model.model.embed_tokens.lora_embedding_A' is not "
                    + "a PEFT LoRA weight"), e.getMessage());
        }
    }

    @Test
    void mixedRanksAreWrittenAsPatternsAndMixedRsloraIsRefused() throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            Block model = ToyBlocks.deepSeekLike(m, 2);
            Lora.apply(model, LoraConfig.builder().setRank(2).optTargetModules("q_a_proj").build());
            BlockTrees.replace(model, "model.layers.1.self_attn.o_proj", old -> LoraLinear.builder().setBase(old)
                    .setRank(4).optAlpha(3).build());
            Path dir = tmp.resolve("mixed");
            Lora.save(model, dir);
            JsonObject config = json(dir.resolve(PeftAdapters.CONFIG_FILE));
            assertEquals(2, config.get("r").getAsInt(), "the most common rank");
            // the shortest names that single out the adapter among the adapted modules
            assertEquals("{\"o_proj\":4}", config.get("rank_pattern").toString());
            assertEquals("{\"o_proj\":3}", config.get("alpha_pattern").toString());
            Block back = ToyBlocks.deepSeekLike(m, 2);
            Lora.load(back, dir);
            LoraLinear o = Lora.adapters(back).get("model.layers.1.self_attn.o_proj");
            assertEquals(4, o.rank());
            assertEquals(3f, o.alpha());
            assertEquals(2, Lora.adapters(back).get("model.layers.1.self_attn.q_a_proj").rank());

            BlockTrees.replace(model, "model.layers.0.self_attn.o_proj", old -> LoraLinear.builder().setBase(old)
                    .setRank(4).optUseRslora(true).build());
            Path dir2 = tmp.resolve("rslora");
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> Lora.save(model, dir2));
            assertTrue(e.getMessage().contains("use_rslora is one setting"), e.getMessage());
            assertFalse(Files.exists(dir2), "nothing written");
            assertThrows(IllegalStateException.class, () -> Lora.save(ToyBlocks.deepSeekLike(m, 1), dir2));
        }
    }

    /** PEFT adapters trained in bfloat16 are saved as BF16: read through Java's conversion (DJL aborts on BF16). */
    @Test
    void bf16AdapterFileLoads() throws IOException {
        Path dir = fixtureWithConfig("bf16", c -> { });
        SafetensorsWriter writer = new SafetensorsWriter().putMetadata("format", "pt");
        try (SafetensorsFile f32 = SafetensorsFile.open(FIXTURE.resolve(PeftAdapters.WEIGHTS_FILE))) {
            for (String name : f32.names()) {
                float[] v = f32.readFloats(name);
                ByteBuffer bytes = ByteBuffer.allocate(2 * v.length).order(java.nio.ByteOrder.LITTLE_ENDIAN);
                for (float x : v) {
                    bytes.putShort(ai.djl.memopt.safetensors.Halfs.floatToBf16(x));
                }
                writer.add(name, ai.djl.memopt.safetensors.SafetensorsDType.BF16, f32.info(name).shape(),
                        bytes.flip());
            }
        }
        writer.write(dir.resolve(PeftAdapters.WEIGHTS_FILE));
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile f32 = SafetensorsFile.open(FIXTURE.resolve(PeftAdapters.WEIGHTS_FILE))) {
            Block model = ToyBlocks.deepSeekLike(m, 3);
            Lora.load(model, dir);
            LoraLinear l = Lora.adapters(model).get("model.layers.2.self_attn.o_proj");
            assertEquals(DataType.FLOAT32, l.loraB().getArray().getDataType());
            float[] want = f32.readFloats(PeftAdapters.PREFIX + "model.layers.2.self_attn.o_proj.lora_B.weight");
            float[] got = l.loraB().getArray().toFloatArray();
            for (int i = 0; i < want.length; i++) {
                assertEquals(want[i], got[i], Math.abs(want[i]) / 128, "bf16 keeps 8 significant bits");
            }
        }
    }
}
