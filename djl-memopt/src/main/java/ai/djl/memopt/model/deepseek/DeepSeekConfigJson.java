package ai.djl.memopt.model.deepseek;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

/**
 * Reads and writes a Hugging Face {@code config.json} for {@link DeepSeekConfig}: field by field, each with its type
 * checked, and the values this implementation cannot honour rejected naming the field (the ranges are checked by
 * {@link DeepSeekConfigValidation} when the builder builds).
 */
final class DeepSeekConfigJson {

    private DeepSeekConfigJson() {}

    /**
     * Reads a {@code config.json} file.
     *
     * @throws IOException if the file cannot be read
     * @throws IllegalArgumentException naming the file, the field and the value when it is malformed or unsupported
     */
    static DeepSeekConfig read(Path configJson) throws IOException {
        String text = Files.readString(configJson, StandardCharsets.UTF_8);
        JsonObject obj;
        try {
            JsonElement e = JsonParser.parseString(text);
            if (!e.isJsonObject()) {
                throw new IllegalArgumentException(configJson + ": not a JSON object");
            }
            obj = e.getAsJsonObject();
        } catch (JsonParseException e) {
            throw new IllegalArgumentException(configJson + ": invalid JSON: " + e.getMessage(), e);
        }
        try {
            return read(obj).build();
        } catch (IllegalArgumentException e) {
            throw new IllegalArgumentException(configJson + ": " + e.getMessage(), e);
        }
    }

    /** Reads the text of a {@code config.json}. */
    static DeepSeekConfig read(String json) {
        JsonElement e;
        try {
            e = JsonParser.parseString(json);
        } catch (JsonParseException ex) {
            throw new IllegalArgumentException("invalid JSON: " + ex.getMessage(), ex);
        }
        if (!e.isJsonObject()) {
            throw new IllegalArgumentException("config is not a JSON object");
        }
        return read(e.getAsJsonObject()).build();
    }

    /** {@link #write} as pretty-printed text. */
    static String toJson(DeepSeekConfig c) {
        Gson gson = new GsonBuilder().setPrettyPrinting().serializeNulls().create();
        return gson.toJson(write(c));
    }

    /** A builder holding the fields of {@code o}, not yet validated. */
    static DeepSeekConfig.Builder read(JsonObject o) {
        String type = optString(o, "model_type", null);
        if (type == null) {
            throw new IllegalArgumentException("missing required field model_type");
        }
        DeepSeekConfig.Builder b = DeepSeekConfig.builder(type);
        b.vocabSize(reqInt(o, "vocab_size"));
        b.hiddenSize(reqInt(o, "hidden_size"));
        b.intermediateSize(reqInt(o, "intermediate_size"));
        b.moeIntermediateSize(reqInt(o, "moe_intermediate_size"));
        b.numHiddenLayers(reqInt(o, "num_hidden_layers"));
        b.numAttentionHeads(reqInt(o, "num_attention_heads"));
        if (o.has("q_lora_rank")) {
            JsonElement q = o.get("q_lora_rank");
            b.qLoraRank(q.isJsonNull() ? null : asInt(q, "q_lora_rank"));
        }
        b.kvLoraRank(reqInt(o, "kv_lora_rank"));
        b.qkNopeHeadDim(reqInt(o, "qk_nope_head_dim"));
        b.qkRopeHeadDim(reqInt(o, "qk_rope_head_dim"));
        b.vHeadDim(reqInt(o, "v_head_dim"));
        b.nRoutedExperts(reqInt(o, "n_routed_experts"));
        b.numExpertsPerTok(reqInt(o, "num_experts_per_tok"));
        Integer v;
        if ((v = optInt(o, "n_shared_experts")) != null) {
            b.nSharedExperts(v);
        }
        if ((v = optInt(o, "n_group")) != null) {
            b.nGroup(v);
        }
        if ((v = optInt(o, "topk_group")) != null) {
            b.topkGroup(v);
        }
        if ((v = optInt(o, "first_k_dense_replace")) != null) {
            b.firstKDenseReplace(v);
        }
        if ((v = optInt(o, "max_position_embeddings")) != null) {
            b.maxPositionEmbeddings(v);
        }
        Double d;
        if ((d = optDouble(o, "routed_scaling_factor")) != null) {
            b.routedScalingFactor(d);
        }
        if ((d = optDouble(o, "rms_norm_eps")) != null) {
            b.rmsNormEps(d);
        }
        if ((d = optDouble(o, "initializer_range")) != null) {
            b.initializerRange(d);
        }
        Boolean z;
        if ((z = optBool(o, "norm_topk_prob")) != null) {
            b.normTopkProb(z);
        }
        if ((z = optBool(o, "rope_interleave")) != null) {
            b.ropeInterleave(z);
        }
        if ((z = optBool(o, "tie_word_embeddings")) != null) {
            b.tieWordEmbeddings(z);
        }
        if (Boolean.TRUE.equals(optBool(o, "attention_bias"))) {
            throw new IllegalArgumentException("attention_bias true is not supported (DeepSeek projections have no bias)");
        }
        if (Boolean.TRUE.equals(optBool(o, "mlp_bias"))) {
            throw new IllegalArgumentException("mlp_bias true is not supported (DeepSeek projections have no bias)");
        }
        Integer kvHeads = optInt(o, "num_key_value_heads");
        if (kvHeads != null && kvHeads != reqInt(o, "num_attention_heads")) {
            throw new IllegalArgumentException(
                    "num_key_value_heads " + kvHeads + " must equal num_attention_heads " + reqInt(o, "num_attention_heads")
                            + " (multi-head latent attention has one key/value per head)");
        }
        String act = optString(o, "hidden_act", null);
        if (act != null) {
            b.hiddenAct(act);
        }
        String method = optString(o, "topk_method", null);
        if (method != null) {
            b.topkMethod(method);
        }
        String scoring = optString(o, "scoring_func", null);
        if (scoring != null) {
            String expected = DeepSeekConfig.DEEPSEEK_V3.equals(type) ? "sigmoid" : "softmax";
            if (!expected.equals(scoring)) {
                throw new IllegalArgumentException(
                        "scoring_func '" + scoring + "' is not supported for " + type + " (expected " + expected + ")");
            }
        }
        // rope: transformers 5 writes rope_parameters (rope_theta inside), 4.x rope_scaling + top-level rope_theta
        if ((d = optDouble(o, "rope_theta")) != null) {
            b.ropeTheta(d);
        }
        JsonObject rope = null;
        for (String key : new String[] {"rope_parameters", "rope_scaling"}) {
            if (o.has(key) && !o.get(key).isJsonNull()) {
                if (!o.get(key).isJsonObject()) {
                    throw new IllegalArgumentException(key + " must be an object, got " + o.get(key));
                }
                rope = o.getAsJsonObject(key);
                break;
            }
        }
        if (rope != null) {
            if ((d = optDouble(rope, "rope_theta")) != null) {
                b.ropeTheta(d);
            }
            String rt = optString(rope, "rope_type", null);
            if (rt == null) {
                rt = optString(rope, "type", "default");
            }
            if ("yarn".equals(rt)) {
                Double factor = optDouble(rope, "factor");
                if (factor == null) {
                    throw new IllegalArgumentException("rope type yarn needs a factor");
                }
                Integer original = optInt(rope, "original_max_position_embeddings");
                Double bf = optDouble(rope, "beta_fast");
                Double bs = optDouble(rope, "beta_slow");
                Double ms = optDouble(rope, "mscale");
                Double msa = optDouble(rope, "mscale_all_dim");
                b.yarn(factor, original, bf == null ? 32 : bf, bs == null ? 1 : bs, ms == null ? 0 : ms,
                        msa == null ? 0 : msa);
                b.attentionFactor(optDouble(rope, "attention_factor"));
                Boolean truncate = optBool(rope, "truncate");
                b.ropeTruncate(truncate == null || truncate);
            } else if (!"default".equals(rt)) {
                throw new IllegalArgumentException(
                        "rope type '" + rt + "' is not supported (supported: default, yarn)");
            }
        }
        return b;
    }

    private static JsonElement field(JsonObject o, String name) {
        JsonElement e = o.get(name);
        return e == null || e.isJsonNull() ? null : e;
    }

    private static int reqInt(JsonObject o, String name) {
        JsonElement e = field(o, name);
        if (e == null) {
            throw new IllegalArgumentException("missing required field " + name);
        }
        return asInt(e, name);
    }

    private static Integer optInt(JsonObject o, String name) {
        JsonElement e = field(o, name);
        return e == null ? null : asInt(e, name);
    }

    private static int asInt(JsonElement e, String name) {
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isNumber()) {
            throw new IllegalArgumentException(name + " must be an integer, got " + e);
        }
        double value = e.getAsDouble();
        if (value != Math.rint(value) || Math.abs(value) > Integer.MAX_VALUE) {
            throw new IllegalArgumentException(name + " must be an integer, got " + e);
        }
        return (int) value;
    }

    private static Double optDouble(JsonObject o, String name) {
        JsonElement e = field(o, name);
        if (e == null) {
            return null;
        }
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isNumber()) {
            throw new IllegalArgumentException(name + " must be a number, got " + e);
        }
        return e.getAsDouble();
    }

    private static Boolean optBool(JsonObject o, String name) {
        JsonElement e = field(o, name);
        if (e == null) {
            return null;
        }
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isBoolean()) {
            throw new IllegalArgumentException(name + " must be true or false, got " + e);
        }
        return e.getAsBoolean();
    }

    private static String optString(JsonObject o, String name, String def) {
        JsonElement e = field(o, name);
        if (e == null) {
            return def;
        }
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isString()) {
            throw new IllegalArgumentException(name + " must be a string, got " + e);
        }
        return e.getAsString();
    }

    /** The {@code config.json} object of {@code c}, as Hugging Face writes it (read back equal by {@link #read}). */
    static JsonObject write(DeepSeekConfig c) {
        JsonObject o = new JsonObject();
        JsonArray arch = new JsonArray();
        arch.add(c.isV3() ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM");
        o.add("architectures", arch);
        o.addProperty("model_type", c.modelType());
        o.addProperty("vocab_size", c.vocabSize());
        o.addProperty("hidden_size", c.hiddenSize());
        o.addProperty("intermediate_size", c.intermediateSize());
        o.addProperty("moe_intermediate_size", c.moeIntermediateSize());
        o.addProperty("num_hidden_layers", c.numHiddenLayers());
        o.addProperty("num_attention_heads", c.numAttentionHeads());
        o.addProperty("num_key_value_heads", c.numAttentionHeads());
        o.add("q_lora_rank",
                c.qLoraRank().isPresent() ? new JsonPrimitive(c.qLoraRank().getAsInt()) : JsonNull.INSTANCE);
        o.addProperty("kv_lora_rank", c.kvLoraRank());
        o.addProperty("qk_nope_head_dim", c.qkNopeHeadDim());
        o.addProperty("qk_rope_head_dim", c.qkRopeHeadDim());
        o.addProperty("v_head_dim", c.vHeadDim());
        o.addProperty("qk_head_dim", c.qkNopeHeadDim() + c.qkRopeHeadDim());
        o.addProperty("head_dim", c.qkRopeHeadDim());
        o.addProperty("n_routed_experts", c.nRoutedExperts());
        o.addProperty("n_shared_experts", c.nSharedExperts());
        o.addProperty("num_experts_per_tok", c.numExpertsPerTok());
        o.addProperty("n_group", c.nGroup());
        o.addProperty("topk_group", c.topkGroup());
        o.addProperty("routed_scaling_factor", c.routedScalingFactor());
        o.addProperty("norm_topk_prob", c.normTopkProb());
        o.addProperty("first_k_dense_replace", c.firstKDenseReplace());
        o.addProperty("rms_norm_eps", c.rmsNormEps());
        o.addProperty("rope_theta", c.ropeTheta());
        JsonObject rope = new JsonObject();
        rope.addProperty("rope_type", c.ropeType());
        rope.addProperty("rope_theta", c.ropeTheta());
        if (c.isYarn()) {
            rope.addProperty("type", c.ropeType());
            rope.addProperty("factor", c.ropeFactor());
            if (c.originalMaxPositionEmbeddingsOrNull() != null) {
                rope.addProperty("original_max_position_embeddings", c.originalMaxPositionEmbeddingsOrNull());
            }
            if (!c.ropeTruncate()) {
                rope.addProperty("truncate", false);
            }
            rope.addProperty("beta_fast", c.betaFast());
            rope.addProperty("beta_slow", c.betaSlow());
            rope.addProperty("mscale", c.mscale());
            rope.addProperty("mscale_all_dim", c.mscaleAllDim());
            if (c.attentionFactorOrNull() != null) {
                rope.addProperty("attention_factor", c.attentionFactorOrNull());
            }
        }
        o.add("rope_parameters", rope);
        if (c.isV3()) {
            o.addProperty("rope_interleave", c.ropeInterleave());
            o.addProperty("topk_method", "noaux_tc");
            o.addProperty("scoring_func", "sigmoid");
        } else {
            o.addProperty("topk_method", c.topkMethod());
            o.addProperty("scoring_func", "softmax");
        }
        o.addProperty("tie_word_embeddings", c.tieWordEmbeddings());
        o.addProperty("max_position_embeddings", c.maxPositionEmbeddings());
        o.addProperty("hidden_act", c.hiddenAct());
        o.addProperty("initializer_range", c.initializerRange());
        o.addProperty("attention_bias", false);
        o.addProperty("torch_dtype", "float32");
        return o;
    }
}
