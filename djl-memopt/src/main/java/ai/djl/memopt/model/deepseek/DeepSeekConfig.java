package ai.djl.memopt.model.deepseek;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Locale;
import java.util.OptionalInt;

/**
 * The architecture of a DeepSeek-V3 ({@code model_type "deepseek_v3"}) or DeepSeek-V2 ({@code "deepseek_v2"}) model, read
 * from a Hugging Face {@code config.json}. Immutable; getters are named after the Hugging Face fields in camelCase.
 *
 * <p>Only fields that change the computation are kept. A value this implementation cannot honour (an activation other
 * than {@code silu}, a rope type other than {@code default}/{@code yarn}, attention biases, a V2 {@code topk_method} other
 * than {@code greedy}/{@code group_limited_greedy}, ...) is rejected with an {@link IllegalArgumentException} naming the
 * field and the value, rather than silently computing something else.
 *
 * <pre>{@code
 * DeepSeekConfig config = DeepSeekConfig.fromJson(dir.resolve("config.json"));
 * DeepSeekConfig bench = DeepSeekConfig.preset("bench-small");
 * }</pre>
 */
public final class DeepSeekConfig {

    /** {@code model_type} of DeepSeek-V3. */
    public static final String DEEPSEEK_V3 = "deepseek_v3";
    /** {@code model_type} of DeepSeek-V2. */
    public static final String DEEPSEEK_V2 = "deepseek_v2";

    private final String modelType;
    private final int vocabSize;
    private final int hiddenSize;
    private final int intermediateSize;
    private final int moeIntermediateSize;
    private final int numHiddenLayers;
    private final int numAttentionHeads;
    private final Integer qLoraRank;
    private final int kvLoraRank;
    private final int qkNopeHeadDim;
    private final int qkRopeHeadDim;
    private final int vHeadDim;
    private final int nRoutedExperts;
    private final int nSharedExperts;
    private final int numExpertsPerTok;
    private final int nGroup;
    private final int topkGroup;
    private final double routedScalingFactor;
    private final boolean normTopkProb;
    private final int firstKDenseReplace;
    private final double rmsNormEps;
    private final double ropeTheta;
    private final String ropeType;
    private final double ropeFactor;
    private final Integer originalMaxPositionEmbeddings;
    private final boolean ropeTruncate;
    private final double betaFast;
    private final double betaSlow;
    private final double mscale;
    private final double mscaleAllDim;
    private final Double attentionFactor;
    private final boolean ropeInterleave;
    private final boolean tieWordEmbeddings;
    private final int maxPositionEmbeddings;
    private final String hiddenAct;
    private final String topkMethod;
    private final double initializerRange;

    private DeepSeekConfig(Builder b) {
        this.modelType = b.modelType;
        this.vocabSize = b.vocabSize;
        this.hiddenSize = b.hiddenSize;
        this.intermediateSize = b.intermediateSize;
        this.moeIntermediateSize = b.moeIntermediateSize;
        this.numHiddenLayers = b.numHiddenLayers;
        this.numAttentionHeads = b.numAttentionHeads;
        this.qLoraRank = b.qLoraRank;
        this.kvLoraRank = b.kvLoraRank;
        this.qkNopeHeadDim = b.qkNopeHeadDim;
        this.qkRopeHeadDim = b.qkRopeHeadDim;
        this.vHeadDim = b.vHeadDim;
        this.nRoutedExperts = b.nRoutedExperts;
        this.nSharedExperts = b.nSharedExperts;
        this.numExpertsPerTok = b.numExpertsPerTok;
        this.nGroup = b.nGroup;
        this.topkGroup = b.topkGroup;
        this.routedScalingFactor = b.routedScalingFactor;
        this.normTopkProb = b.normTopkProb;
        this.firstKDenseReplace = b.firstKDenseReplace;
        this.rmsNormEps = b.rmsNormEps;
        this.ropeTheta = b.ropeTheta;
        this.ropeType = b.ropeType;
        this.ropeFactor = b.ropeFactor;
        this.originalMaxPositionEmbeddings = b.originalMaxPositionEmbeddings;
        this.ropeTruncate = b.ropeTruncate;
        this.betaFast = b.betaFast;
        this.betaSlow = b.betaSlow;
        this.mscale = b.mscale;
        this.mscaleAllDim = b.mscaleAllDim;
        this.attentionFactor = b.attentionFactor;
        this.ropeInterleave = b.ropeInterleave;
        this.tieWordEmbeddings = b.tieWordEmbeddings;
        this.maxPositionEmbeddings = b.maxPositionEmbeddings;
        this.hiddenAct = b.hiddenAct;
        this.topkMethod = b.topkMethod;
        this.initializerRange = b.initializerRange;
    }

    /** A builder with the Hugging Face defaults of the given {@code model_type}. */
    public static Builder builder(String modelType) {
        return new Builder(modelType);
    }

    /** A builder holding this config's values, to derive a variant. */
    public Builder toBuilder() {
        return fromObject(toJsonObject(), "(copy)");
    }

    /**
     * Reads a Hugging Face {@code config.json}.
     *
     * @throws IOException if the file cannot be read
     * @throws IllegalArgumentException naming the file, the field and the value when it is malformed or unsupported
     */
    public static DeepSeekConfig fromJson(Path configJson) throws IOException {
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
            return fromObject(obj, configJson.toString()).build();
        } catch (IllegalArgumentException e) {
            throw new IllegalArgumentException(configJson + ": " + e.getMessage(), e);
        }
    }

    /** Parses the text of a {@code config.json}. */
    public static DeepSeekConfig fromJsonString(String json) {
        JsonElement e;
        try {
            e = JsonParser.parseString(json);
        } catch (JsonParseException ex) {
            throw new IllegalArgumentException("invalid JSON: " + ex.getMessage(), ex);
        }
        if (!e.isJsonObject()) {
            throw new IllegalArgumentException("config is not a JSON object");
        }
        return fromObject(e.getAsJsonObject(), "(string)").build();
    }

    /**
     * A named architecture: {@code bench-tiny} (V3 style, a few million parameters, a training step well under a second
     * on CPU), {@code bench-small} (V3 style, 284,301,312 parameters) or {@code deepseek-v2-lite} (the shape of
     * DeepSeek-V2-Lite, about 15.7B parameters).
     */
    public static DeepSeekConfig preset(String name) {
        switch (name) {
            case "bench-tiny":
                return builder(DEEPSEEK_V3)
                        .vocabSize(4096).hiddenSize(256).intermediateSize(704).moeIntermediateSize(128)
                        .numHiddenLayers(4).numAttentionHeads(4).qLoraRank(96).kvLoraRank(64)
                        .qkNopeHeadDim(32).qkRopeHeadDim(16).vHeadDim(32).nRoutedExperts(8).nSharedExperts(1)
                        .numExpertsPerTok(2).nGroup(2).topkGroup(1).routedScalingFactor(2.5).normTopkProb(true)
                        .firstKDenseReplace(1).maxPositionEmbeddings(2048).tieWordEmbeddings(false).build();
            case "bench-small":
                return builder(DEEPSEEK_V3)
                        .vocabSize(32000).hiddenSize(1024).intermediateSize(2816).moeIntermediateSize(512)
                        .numHiddenLayers(8).numAttentionHeads(16).nRoutedExperts(16).nSharedExperts(1)
                        .numExpertsPerTok(4).nGroup(4).topkGroup(2).routedScalingFactor(2.5).normTopkProb(true)
                        .qLoraRank(384).kvLoraRank(256).qkNopeHeadDim(64).qkRopeHeadDim(32).vHeadDim(64)
                        .firstKDenseReplace(1).maxPositionEmbeddings(4096).tieWordEmbeddings(false).build();
            case "deepseek-v2-lite":
                return builder(DEEPSEEK_V2)
                        .vocabSize(102400).hiddenSize(2048).intermediateSize(10944).moeIntermediateSize(1408)
                        .numHiddenLayers(27).numAttentionHeads(16).qLoraRank(null).kvLoraRank(512)
                        .qkNopeHeadDim(128).qkRopeHeadDim(64).vHeadDim(128).nRoutedExperts(64).nSharedExperts(2)
                        .numExpertsPerTok(6).nGroup(1).topkGroup(1).firstKDenseReplace(1).topkMethod("greedy")
                        .normTopkProb(false).routedScalingFactor(1.0).ropeTheta(10000).rmsNormEps(1e-6)
                        .yarn(40, 4096, 32, 1, 0.707, 0.707).maxPositionEmbeddings(163840)
                        .tieWordEmbeddings(false).build();
            default:
                throw new IllegalArgumentException(
                        "unknown preset '" + name + "'; known: bench-tiny, bench-small, deepseek-v2-lite");
        }
    }

    // ---------------------------------------------------------------- parsing

    private static Builder fromObject(JsonObject o, String source) {
        String type = optString(o, "model_type", null);
        if (type == null) {
            throw new IllegalArgumentException("missing required field model_type");
        }
        Builder b = new Builder(type);
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
        if (kvHeads != null && kvHeads != b.numAttentionHeads) {
            throw new IllegalArgumentException(
                    "num_key_value_heads " + kvHeads + " must equal num_attention_heads " + b.numAttentionHeads
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
            String expected = DEEPSEEK_V3.equals(type) ? "sigmoid" : "softmax";
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

    // ---------------------------------------------------------------- writing

    /** A Hugging Face compatible {@code config.json} text that {@link #fromJsonString} reads back equal. */
    public String toJson() {
        Gson gson = new GsonBuilder().setPrettyPrinting().serializeNulls().create();
        return gson.toJson(toJsonObject());
    }

    private JsonObject toJsonObject() {
        JsonObject o = new JsonObject();
        JsonArray arch = new JsonArray();
        arch.add(isV3() ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM");
        o.add("architectures", arch);
        o.addProperty("model_type", modelType);
        o.addProperty("vocab_size", vocabSize);
        o.addProperty("hidden_size", hiddenSize);
        o.addProperty("intermediate_size", intermediateSize);
        o.addProperty("moe_intermediate_size", moeIntermediateSize);
        o.addProperty("num_hidden_layers", numHiddenLayers);
        o.addProperty("num_attention_heads", numAttentionHeads);
        o.addProperty("num_key_value_heads", numAttentionHeads);
        o.add("q_lora_rank", qLoraRank == null ? com.google.gson.JsonNull.INSTANCE : new JsonPrimitive(qLoraRank));
        o.addProperty("kv_lora_rank", kvLoraRank);
        o.addProperty("qk_nope_head_dim", qkNopeHeadDim);
        o.addProperty("qk_rope_head_dim", qkRopeHeadDim);
        o.addProperty("v_head_dim", vHeadDim);
        o.addProperty("qk_head_dim", qkNopeHeadDim + qkRopeHeadDim);
        o.addProperty("head_dim", qkRopeHeadDim);
        o.addProperty("n_routed_experts", nRoutedExperts);
        o.addProperty("n_shared_experts", nSharedExperts);
        o.addProperty("num_experts_per_tok", numExpertsPerTok);
        o.addProperty("n_group", nGroup);
        o.addProperty("topk_group", topkGroup);
        o.addProperty("routed_scaling_factor", routedScalingFactor);
        o.addProperty("norm_topk_prob", normTopkProb);
        o.addProperty("first_k_dense_replace", firstKDenseReplace);
        o.addProperty("rms_norm_eps", rmsNormEps);
        o.addProperty("rope_theta", ropeTheta);
        JsonObject rope = new JsonObject();
        rope.addProperty("rope_type", ropeType);
        rope.addProperty("rope_theta", ropeTheta);
        if (isYarn()) {
            rope.addProperty("type", ropeType);
            rope.addProperty("factor", ropeFactor);
            if (originalMaxPositionEmbeddings != null) {
                rope.addProperty("original_max_position_embeddings", originalMaxPositionEmbeddings);
            }
            if (!ropeTruncate) {
                rope.addProperty("truncate", false);
            }
            rope.addProperty("beta_fast", betaFast);
            rope.addProperty("beta_slow", betaSlow);
            rope.addProperty("mscale", mscale);
            rope.addProperty("mscale_all_dim", mscaleAllDim);
            if (attentionFactor != null) {
                rope.addProperty("attention_factor", attentionFactor);
            }
        }
        o.add("rope_parameters", rope);
        if (isV3()) {
            o.addProperty("rope_interleave", ropeInterleave);
            o.addProperty("topk_method", "noaux_tc");
            o.addProperty("scoring_func", "sigmoid");
        } else {
            o.addProperty("topk_method", topkMethod);
            o.addProperty("scoring_func", "softmax");
        }
        o.addProperty("tie_word_embeddings", tieWordEmbeddings);
        o.addProperty("max_position_embeddings", maxPositionEmbeddings);
        o.addProperty("hidden_act", hiddenAct);
        o.addProperty("initializer_range", initializerRange);
        o.addProperty("attention_bias", false);
        o.addProperty("torch_dtype", "float32");
        return o;
    }

    // ---------------------------------------------------------------- derived values

    /** True for {@code deepseek_v3} (sigmoid router with correction bias), false for {@code deepseek_v2}. */
    public boolean isV3() {
        return DEEPSEEK_V3.equals(modelType);
    }

    /** True when the rotary embedding uses YaRN scaling. */
    public boolean isYarn() {
        return "yarn".equals(ropeType);
    }

    /** {@code qk_nope_head_dim + qk_rope_head_dim}. */
    public int qkHeadDim() {
        return qkNopeHeadDim + qkRopeHeadDim;
    }

    /** YaRN's magnitude correction {@code 0.1 * m * ln(scale) + 1} (1 for {@code scale <= 1}). */
    public static double yarnGetMscale(double scale, double m) {
        return scale <= 1 ? 1.0 : 0.1 * m * Math.log(scale) + 1.0;
    }

    /**
     * The factor that multiplies rotary cos/sin: 1 for default rope; for YaRN {@code attention_factor} if given, else
     * {@code mscale(f, mscale) / mscale(f, mscale_all_dim)} when both are set, else {@code mscale(f, 1)} (transformers'
     * {@code _compute_yarn_parameters}).
     */
    public double ropeAttentionScaling() {
        if (!isYarn()) {
            return 1.0;
        }
        if (attentionFactor != null) {
            return attentionFactor;
        }
        if (mscale != 0 && mscaleAllDim != 0) {
            return yarnGetMscale(yarnFactor(), mscale) / yarnGetMscale(yarnFactor(), mscaleAllDim);
        }
        return yarnGetMscale(yarnFactor(), 1.0);
    }

    /**
     * The scaling factor transformers' {@code _compute_yarn_parameters} actually uses for the frequencies and the
     * attention factor: {@code max_position_embeddings / original_max_position_embeddings} when the latter is given,
     * else {@code factor}.
     */
    public double yarnFactor() {
        return originalMaxPositionEmbeddings != null
                ? (double) maxPositionEmbeddings / originalMaxPositionEmbeddings
                : ropeFactor;
    }

    /** The context YaRN's correction range is computed for (the original one, else {@code max_position_embeddings}). */
    public int yarnOriginalContext() {
        return originalMaxPositionEmbeddings != null ? originalMaxPositionEmbeddings : maxPositionEmbeddings;
    }

    /** YaRN's {@code truncate} (floor/ceil the correction range; default true). */
    public boolean ropeTruncate() {
        return ropeTruncate;
    }

    /**
     * The attention softmax scale: {@code qk_head_dim^-0.5}, times {@code mscale(factor, mscale_all_dim)^2} under YaRN
     * with a non-zero {@code mscale_all_dim} ({@code factor} as configured). Transformers 5.17 applies that correction
     * in DeepSeek-V3 and in V2 (as DeepSeek's own V2 code does); the V2 fixture fails without it (logits off by 2e-3).
     */
    public double softmaxScale() {
        double scale = Math.pow(qkHeadDim(), -0.5);
        if (isYarn() && mscaleAllDim != 0) {
            double m = yarnGetMscale(ropeFactor, mscaleAllDim);
            scale = scale * m * m;
        }
        return scale;
    }

    /** Whether decoder layer {@code i} has a mixture of experts (else a dense SwiGLU MLP). */
    public boolean isMoeLayer(int layer) {
        return nRoutedExperts > 0 && layer >= firstKDenseReplace;
    }

    /** Number of trained parameters (buffers such as {@code e_score_correction_bias} excluded), from shapes only. */
    public long parameterCount() {
        long h = hiddenSize;
        long heads = numAttentionHeads;
        long attn = 0;
        if (qLoraRank == null) {
            attn += h * heads * qkHeadDim();
        } else {
            attn += h * qLoraRank + qLoraRank + (long) qLoraRank * heads * qkHeadDim();
        }
        attn += h * (kvLoraRank + qkRopeHeadDim) + kvLoraRank + (long) kvLoraRank * heads * (qkNopeHeadDim + vHeadDim);
        attn += heads * vHeadDim * h;
        long dense = 3 * h * intermediateSize;
        long moe = (long) nRoutedExperts * 3 * h * moeIntermediateSize
                + 3 * h * ((long) moeIntermediateSize * nSharedExperts) + (long) nRoutedExperts * h;
        long total = (long) vocabSize * h * (tieWordEmbeddings ? 1 : 2) + h;
        for (int i = 0; i < numHiddenLayers; i++) {
            total += attn + 2 * h + (isMoeLayer(i) ? moe : dense);
        }
        return total;
    }

    // ---------------------------------------------------------------- getters

    public String modelType() {
        return modelType;
    }

    public int vocabSize() {
        return vocabSize;
    }

    public int hiddenSize() {
        return hiddenSize;
    }

    public int intermediateSize() {
        return intermediateSize;
    }

    public int moeIntermediateSize() {
        return moeIntermediateSize;
    }

    public int numHiddenLayers() {
        return numHiddenLayers;
    }

    public int numAttentionHeads() {
        return numAttentionHeads;
    }

    /** {@code q_lora_rank}, empty when the config has {@code null} (a single {@code q_proj}). */
    public OptionalInt qLoraRank() {
        return qLoraRank == null ? OptionalInt.empty() : OptionalInt.of(qLoraRank);
    }

    public int kvLoraRank() {
        return kvLoraRank;
    }

    public int qkNopeHeadDim() {
        return qkNopeHeadDim;
    }

    public int qkRopeHeadDim() {
        return qkRopeHeadDim;
    }

    public int vHeadDim() {
        return vHeadDim;
    }

    public int nRoutedExperts() {
        return nRoutedExperts;
    }

    public int nSharedExperts() {
        return nSharedExperts;
    }

    public int numExpertsPerTok() {
        return numExpertsPerTok;
    }

    public int nGroup() {
        return nGroup;
    }

    public int topkGroup() {
        return topkGroup;
    }

    public double routedScalingFactor() {
        return routedScalingFactor;
    }

    public boolean normTopkProb() {
        return normTopkProb;
    }

    public int firstKDenseReplace() {
        return firstKDenseReplace;
    }

    public double rmsNormEps() {
        return rmsNormEps;
    }

    public double ropeTheta() {
        return ropeTheta;
    }

    /** {@code default} or {@code yarn}. */
    public String ropeType() {
        return ropeType;
    }

    public double ropeFactor() {
        return ropeFactor;
    }

    /** YaRN's {@code original_max_position_embeddings}, or 0 when not given. */
    public int originalMaxPositionEmbeddings() {
        return originalMaxPositionEmbeddings == null ? 0 : originalMaxPositionEmbeddings;
    }

    public double betaFast() {
        return betaFast;
    }

    public double betaSlow() {
        return betaSlow;
    }

    public double mscale() {
        return mscale;
    }

    public double mscaleAllDim() {
        return mscaleAllDim;
    }

    public boolean ropeInterleave() {
        return ropeInterleave;
    }

    public boolean tieWordEmbeddings() {
        return tieWordEmbeddings;
    }

    public int maxPositionEmbeddings() {
        return maxPositionEmbeddings;
    }

    public String hiddenAct() {
        return hiddenAct;
    }

    /** V3: {@code noaux_tc}; V2: {@code greedy} or {@code group_limited_greedy}. */
    public String topkMethod() {
        return topkMethod;
    }

    public double initializerRange() {
        return initializerRange;
    }

    @Override
    public boolean equals(Object o) {
        if (this == o) {
            return true;
        }
        if (!(o instanceof DeepSeekConfig)) {
            return false;
        }
        return toJsonObject().equals(((DeepSeekConfig) o).toJsonObject());
    }

    @Override
    public int hashCode() {
        return toJsonObject().hashCode();
    }

    @Override
    public String toString() {
        return String.format(
                Locale.ROOT, "DeepSeekConfig(%s, hidden %d, layers %d, heads %d, experts %d/%d, vocab %d)", modelType,
                hiddenSize, numHiddenLayers, numAttentionHeads, numExpertsPerTok, nRoutedExperts, vocabSize);
    }

    // ---------------------------------------------------------------- builder

    /** Builder with the Hugging Face defaults of the model type; {@link #build()} validates. */
    public static final class Builder {
        private final String modelType;
        private int vocabSize;
        private int hiddenSize;
        private int intermediateSize;
        private int moeIntermediateSize;
        private int numHiddenLayers;
        private int numAttentionHeads;
        private Integer qLoraRank = 1536;
        private int kvLoraRank = 512;
        private int qkNopeHeadDim = 128;
        private int qkRopeHeadDim = 64;
        private int vHeadDim = 128;
        private int nRoutedExperts;
        private int nSharedExperts;
        private int numExpertsPerTok;
        private int nGroup;
        private int topkGroup;
        private double routedScalingFactor;
        private boolean normTopkProb;
        private int firstKDenseReplace;
        private double rmsNormEps = 1e-6;
        private double ropeTheta = 10000;
        private String ropeType = "default";
        private double ropeFactor = 1;
        private Integer originalMaxPositionEmbeddings;
        private boolean ropeTruncate = true;
        private double betaFast = 32;
        private double betaSlow = 1;
        private double mscale;
        private double mscaleAllDim;
        private Double attentionFactor;
        private boolean ropeInterleave = true;
        private boolean tieWordEmbeddings;
        private int maxPositionEmbeddings;
        private String hiddenAct = "silu";
        private String topkMethod;
        private double initializerRange = 0.02;

        private Builder(String modelType) {
            if (!DEEPSEEK_V3.equals(modelType) && !DEEPSEEK_V2.equals(modelType)) {
                throw new IllegalArgumentException(
                        "model_type '" + modelType + "' is not supported (expected deepseek_v3 or deepseek_v2)");
            }
            this.modelType = modelType;
            if (DEEPSEEK_V3.equals(modelType)) {
                nSharedExperts = 1;
                nGroup = 8;
                topkGroup = 4;
                routedScalingFactor = 2.5;
                normTopkProb = true;
                firstKDenseReplace = 3;
                maxPositionEmbeddings = 4096;
                topkMethod = "noaux_tc";
            } else {
                nSharedExperts = 2;
                nGroup = 1;
                topkGroup = 1;
                routedScalingFactor = 1.0;
                normTopkProb = false;
                firstKDenseReplace = 0;
                maxPositionEmbeddings = 2048;
                topkMethod = "greedy";
            }
        }

        public Builder vocabSize(int v) { vocabSize = v; return this; }

        public Builder hiddenSize(int v) { hiddenSize = v; return this; }

        public Builder intermediateSize(int v) { intermediateSize = v; return this; }

        public Builder moeIntermediateSize(int v) { moeIntermediateSize = v; return this; }

        public Builder numHiddenLayers(int v) { numHiddenLayers = v; return this; }

        public Builder numAttentionHeads(int v) { numAttentionHeads = v; return this; }

        /** {@code null} for a single {@code q_proj}. */
        public Builder qLoraRank(Integer v) { qLoraRank = v; return this; }

        public Builder kvLoraRank(int v) { kvLoraRank = v; return this; }

        public Builder qkNopeHeadDim(int v) { qkNopeHeadDim = v; return this; }

        public Builder qkRopeHeadDim(int v) { qkRopeHeadDim = v; return this; }

        public Builder vHeadDim(int v) { vHeadDim = v; return this; }

        public Builder nRoutedExperts(int v) { nRoutedExperts = v; return this; }

        public Builder nSharedExperts(int v) { nSharedExperts = v; return this; }

        public Builder numExpertsPerTok(int v) { numExpertsPerTok = v; return this; }

        public Builder nGroup(int v) { nGroup = v; return this; }

        public Builder topkGroup(int v) { topkGroup = v; return this; }

        public Builder routedScalingFactor(double v) { routedScalingFactor = v; return this; }

        public Builder normTopkProb(boolean v) { normTopkProb = v; return this; }

        public Builder firstKDenseReplace(int v) { firstKDenseReplace = v; return this; }

        public Builder rmsNormEps(double v) { rmsNormEps = v; return this; }

        public Builder ropeTheta(double v) { ropeTheta = v; return this; }

        public Builder ropeInterleave(boolean v) { ropeInterleave = v; return this; }

        public Builder tieWordEmbeddings(boolean v) { tieWordEmbeddings = v; return this; }

        public Builder maxPositionEmbeddings(int v) { maxPositionEmbeddings = v; return this; }

        public Builder hiddenAct(String v) { hiddenAct = v; return this; }

        public Builder topkMethod(String v) { topkMethod = v; return this; }

        public Builder initializerRange(double v) { initializerRange = v; return this; }

        /** YaRN rope scaling. */
        public Builder yarn(double factor, Integer originalMaxPositions, double betaFast, double betaSlow, double mscale,
                double mscaleAllDim) {
            this.ropeType = "yarn";
            this.ropeFactor = factor;
            this.originalMaxPositionEmbeddings = originalMaxPositions;
            this.betaFast = betaFast;
            this.betaSlow = betaSlow;
            this.mscale = mscale;
            this.mscaleAllDim = mscaleAllDim;
            return this;
        }

        /** YaRN's {@code truncate}. */
        public Builder ropeTruncate(boolean v) { ropeTruncate = v; return this; }

        /** YaRN's explicit {@code attention_factor} (null: derived from mscale). */
        public Builder attentionFactor(Double v) { attentionFactor = v; return this; }

        /** Plain (unscaled) rotary embedding. */
        public Builder defaultRope() {
            ropeType = "default";
            ropeFactor = 1;
            originalMaxPositionEmbeddings = null;
            ropeTruncate = true;
            mscale = 0;
            mscaleAllDim = 0;
            attentionFactor = null;
            return this;
        }

        /**
         * Validates and builds.
         *
         * @throws IllegalArgumentException naming the field and value the model cannot honour
         */
        public DeepSeekConfig build() {
            positive("vocab_size", vocabSize);
            positive("hidden_size", hiddenSize);
            positive("intermediate_size", intermediateSize);
            positive("num_hidden_layers", numHiddenLayers);
            positive("num_attention_heads", numAttentionHeads);
            positive("kv_lora_rank", kvLoraRank);
            positive("qk_nope_head_dim", qkNopeHeadDim);
            positive("qk_rope_head_dim", qkRopeHeadDim);
            positive("v_head_dim", vHeadDim);
            if (qLoraRank != null) {
                positive("q_lora_rank", qLoraRank);
            }
            check(qkRopeHeadDim % 2 == 0, "qk_rope_head_dim", qkRopeHeadDim, "must be even");
            check(nRoutedExperts >= 0, "n_routed_experts", nRoutedExperts, "must be >= 0");
            check(firstKDenseReplace >= 0, "first_k_dense_replace", firstKDenseReplace, "must be >= 0");
            if (nRoutedExperts > 0 && firstKDenseReplace < numHiddenLayers) {
                positive("moe_intermediate_size", moeIntermediateSize);
                positive("num_experts_per_tok", numExpertsPerTok);
                check(nSharedExperts >= 0, "n_shared_experts", nSharedExperts, "must be >= 0");
                check(numExpertsPerTok <= nRoutedExperts, "num_experts_per_tok", numExpertsPerTok,
                        "exceeds n_routed_experts " + nRoutedExperts);
            }
            check("silu".equals(hiddenAct), "hidden_act", hiddenAct, "only silu is supported");
            check(rmsNormEps > 0, "rms_norm_eps", rmsNormEps, "must be > 0");
            check(ropeTheta > 0, "rope_theta", ropeTheta, "must be > 0");
            if (DEEPSEEK_V3.equals(modelType)) {
                check("noaux_tc".equals(topkMethod), "topk_method", topkMethod,
                        "deepseek_v3 supports only noaux_tc (sigmoid scores with e_score_correction_bias)");
                if (nRoutedExperts > 0) {
                    positive("n_group", nGroup);
                    check(nRoutedExperts % nGroup == 0, "n_routed_experts", nRoutedExperts,
                            "not divisible by n_group " + nGroup);
                    check(topkGroup >= 1 && topkGroup <= nGroup, "topk_group", topkGroup,
                            "must be in 1..n_group " + nGroup);
                    check(nRoutedExperts / nGroup >= 2, "n_group", nGroup,
                            "needs at least 2 experts per group (group score is the sum of the top 2)");
                }
            } else {
                check("greedy".equals(topkMethod) || "group_limited_greedy".equals(topkMethod), "topk_method",
                        topkMethod, "deepseek_v2 supports greedy or group_limited_greedy");
                if ("group_limited_greedy".equals(topkMethod) && nRoutedExperts > 0) {
                    positive("n_group", nGroup);
                    check(nRoutedExperts % nGroup == 0, "n_routed_experts", nRoutedExperts,
                            "not divisible by n_group " + nGroup);
                    check(topkGroup >= 1 && topkGroup <= nGroup, "topk_group", topkGroup,
                            "must be in 1..n_group " + nGroup);
                }
            }
            if ("yarn".equals(ropeType)) {
                check(ropeFactor > 0, "rope factor", ropeFactor, "must be > 0");
                if (originalMaxPositionEmbeddings != null) {
                    positive("original_max_position_embeddings", originalMaxPositionEmbeddings);
                }
                check(betaFast > betaSlow, "beta_fast", betaFast, "must exceed beta_slow " + betaSlow);
            }
            positive("max_position_embeddings", maxPositionEmbeddings);
            return new DeepSeekConfig(this);
        }

        private static void positive(String field, int value) {
            check(value > 0, field, value, "must be > 0");
        }

        private static void check(boolean ok, String field, Object value, String why) {
            if (!ok) {
                throw new IllegalArgumentException(field + " " + (value instanceof String ? "'" + value + "'" : value)
                        + ": " + why);
            }
        }
    }
}
