package ai.djl.memopt.model.deepseek;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Parameter;
import ai.djl.training.initializer.Initializer;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;
import java.util.function.Consumer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class DeepSeekConfigTest {

    @TempDir Path tmp;

    private static JsonObject fixtureJson(Path dir) throws Exception {
        return JsonParser.parseString(Files.readString(dir.resolve("config.json"))).getAsJsonObject();
    }

    private static String messageOf(Path dir, Consumer<JsonObject> edit) throws Exception {
        JsonObject o = fixtureJson(dir);
        edit.accept(o);
        IllegalArgumentException e =
                assertThrows(IllegalArgumentException.class, () -> DeepSeekConfig.fromJsonString(o.toString()));
        return e.getMessage();
    }

    @Test
    void readsTheFixtureConfigs() throws Exception {
        DeepSeekConfig v3 = DeepSeekConfig.fromJson(Fixtures.V3.resolve("config.json"));
        assertTrue(v3.isV3());
        assertEquals(64, v3.hiddenSize());
        assertEquals(32, v3.qLoraRank().getAsInt());
        assertEquals(16, v3.kvLoraRank());
        assertEquals(2, v3.nGroup());
        assertEquals(1, v3.topkGroup());
        assertEquals(2.5, v3.routedScalingFactor());
        assertTrue(v3.ropeInterleave());
        assertEquals("default", v3.ropeType());
        assertEquals(10000.0, v3.ropeTheta());
        assertEquals(Math.pow(24, -0.5), v3.softmaxScale(), 1e-12);

        DeepSeekConfig v2 = DeepSeekConfig.fromJson(Fixtures.V2.resolve("config.json"));
        assertFalse(v2.isV3());
        assertFalse(v2.qLoraRank().isPresent());
        assertEquals("yarn", v2.ropeType());
        assertEquals(64, v2.originalMaxPositionEmbeddings());
        assertEquals(0.707, v2.mscaleAllDim());
        double m = 0.1 * 0.707 * Math.log(4) + 1;
        assertEquals(Math.pow(24, -0.5) * m * m, v2.softmaxScale(), 1e-12);
        assertEquals(1.0, v2.ropeAttentionScaling(), 1e-12); // mscale == mscale_all_dim
    }

    @Test
    void toJsonRoundTrips() throws Exception {
        for (DeepSeekConfig c : new DeepSeekConfig[] {
            DeepSeekConfig.fromJson(Fixtures.V3.resolve("config.json")),
            DeepSeekConfig.fromJson(Fixtures.V2.resolve("config.json")),
            DeepSeekConfig.preset("bench-tiny"),
            DeepSeekConfig.preset("bench-small"),
            DeepSeekConfig.preset("deepseek-v2-lite")
        }) {
            DeepSeekConfig back = DeepSeekConfig.fromJsonString(c.toJson());
            assertEquals(c, back, c.toJson());
            Path file = tmp.resolve("config-" + c.modelType() + ".json");
            Files.writeString(file, c.toJson());
            assertEquals(c, DeepSeekConfig.fromJson(file));
        }
    }

    @Test
    void ropeScalingKeyAndTopLevelThetaAreAccepted() throws Exception {
        JsonObject o = fixtureJson(Fixtures.V2);
        JsonObject rope = o.remove("rope_parameters").getAsJsonObject();
        rope.remove("rope_theta");
        rope.remove("rope_type");
        o.add("rope_scaling", rope); // transformers 4.x layout: {"type": "yarn", ...} + top-level rope_theta
        o.addProperty("rope_theta", 5000.0);
        DeepSeekConfig c = DeepSeekConfig.fromJsonString(o.toString());
        assertEquals("yarn", c.ropeType());
        assertEquals(5000.0, c.ropeTheta());
        assertEquals(4.0, c.ropeFactor());
    }

    @Test
    void rejectsWhatTheModelCannotHonour() throws Exception {
        assertTrue(messageOf(Fixtures.V3, o -> o.addProperty("hidden_act", "gelu")).contains("hidden_act 'gelu'"));
        assertTrue(messageOf(Fixtures.V3, o -> o.getAsJsonObject("rope_parameters").addProperty("rope_type",
                "longrope")).contains("'longrope'"));
        assertTrue(messageOf(Fixtures.V3, o -> o.remove("kv_lora_rank")).contains("missing required field kv_lora_rank"));
        assertTrue(messageOf(Fixtures.V3, o -> o.addProperty("n_group", 3)).contains("n_routed_experts 8"));
        assertTrue(messageOf(Fixtures.V2, o -> o.addProperty("topk_method", "noaux_tc")).contains("'noaux_tc'"));
        assertTrue(messageOf(Fixtures.V3, o -> o.addProperty("model_type", "llama")).contains("'llama'"));
        assertTrue(messageOf(Fixtures.V3, o -> o.addProperty("attention_bias", true)).contains("attention_bias"));
        assertTrue(messageOf(Fixtures.V3, o -> o.addProperty("hidden_size", "big")).contains("hidden_size"));
        assertTrue(messageOf(Fixtures.V3, o -> o.addProperty("num_key_value_heads", 2)).contains("num_key_value_heads"));
        assertTrue(messageOf(Fixtures.V2, o -> o.addProperty("scoring_func", "sigmoid")).contains("scoring_func"));
        assertTrue(messageOf(Fixtures.V2, o -> {
            o.addProperty("topk_method", "group_limited_greedy");
            o.addProperty("n_group", 3);
            o.addProperty("topk_group", 1);
        }).contains("n_routed_experts 8"));
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> DeepSeekConfig.preset("huge"));
        assertTrue(e.getMessage().contains("huge"));
        Path bad = tmp.resolve("config.json");
        Files.writeString(bad, "{\"model_type\": \"deepseek_v3\"");
        e = assertThrows(IllegalArgumentException.class, () -> DeepSeekConfig.fromJson(bad));
        assertTrue(e.getMessage().contains(bad.toString()), e.getMessage());
    }

    /** Parameter shapes of the real block tree, recorded without allocating any weights. */
    static Map<String, Shape> shapesOf(DeepSeekConfig config) {
        DeepSeekForCausalLM lm = new DeepSeekForCausalLM(config);
        Map<String, Shape> shapes = new HashMap<>();
        try (NDManager m = NDManager.newBaseManager()) {
            lm.initializeWith(m, DataType.FLOAT32, name -> new Initializer() {
                @Override
                public NDArray initialize(NDManager manager, Shape shape, DataType dataType) {
                    shapes.put(name, shape);
                    return manager.zeros(new Shape(0), dataType);
                }
            });
            Map<String, Shape> trained = new HashMap<>();
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(lm).entrySet()) {
                if (e.getValue().requiresGradient()) {
                    trained.put(e.getKey(), shapes.get(e.getKey()));
                }
            }
            return trained;
        }
    }

    static long count(Map<String, Shape> shapes) {
        return shapes.values().stream().mapToLong(Shape::size).sum();
    }

    @Test
    void benchSmallHasExactly284301312Parameters() {
        DeepSeekConfig c = DeepSeekConfig.preset("bench-small");
        assertEquals(32000, c.vocabSize());
        assertEquals(384, c.qLoraRank().getAsInt());
        assertEquals(284_301_312L, count(shapesOf(c)));
        assertEquals(284_301_312L, c.parameterCount());
    }

    @Test
    void benchTinyIsAFewMillionParameters() {
        long n = count(shapesOf(DeepSeekConfig.preset("bench-tiny")));
        assertEquals(DeepSeekConfig.preset("bench-tiny").parameterCount(), n);
        assertTrue(n > 1_000_000 && n < 10_000_000, "bench-tiny has " + n);
    }

    @Test
    void deepSeekV2LiteIsAbout15point7BillionParameters() {
        DeepSeekConfig c = DeepSeekConfig.preset("deepseek-v2-lite");
        assertEquals("deepseek_v2", c.modelType());
        assertFalse(c.qLoraRank().isPresent());
        assertEquals(40.0, c.ropeFactor());
        long fromConfig = c.parameterCount();
        assertTrue(fromConfig > 15_600_000_000L && fromConfig < 15_800_000_000L, "v2-lite has " + fromConfig);
        Map<String, Shape> shapes = shapesOf(c);
        assertEquals(fromConfig, count(shapes));
        assertEquals(new Shape(3072, 2048), shapes.get("model.layers.0.self_attn.q_proj.weight"));
        assertEquals(new Shape(576, 2048), shapes.get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"));
        assertEquals(new Shape(64, 2048), shapes.get("model.layers.26.mlp.gate.weight"));
        assertEquals(new Shape(2048, 2816), shapes.get("model.layers.26.mlp.shared_experts.down_proj.weight"));
    }
}
