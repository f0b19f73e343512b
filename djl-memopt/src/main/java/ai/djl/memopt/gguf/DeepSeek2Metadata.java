package ai.djl.memopt.gguf;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import java.util.Locale;
import java.util.Optional;

/**
 * The metadata of llama.cpp's {@code deepseek2} architecture (DeepSeek-V2 and V3) and its mapping to and from
 * {@link DeepSeekConfig}, key for key as llama.cpp's {@code convert_hf_to_gguf.py} ({@code DeepseekV2Model}) writes
 * them and {@code src/models/deepseek2.cpp} reads them, with the value types llama.cpp checks.
 *
 * <table>
 *   <caption>Keys (prefix {@code deepseek2.})</caption>
 *   <tr><th>key</th><th>config</th></tr>
 *   <tr><td>block_count, context_length, embedding_length, feed_forward_length, vocab_size</td>
 *       <td>num_hidden_layers, max_position_embeddings, hidden_size, intermediate_size, vocab_size</td></tr>
 *   <tr><td>attention.head_count / head_count_kv</td><td>num_attention_heads / 1 (MLA runs as MQA)</td></tr>
 *   <tr><td>attention.q_lora_rank, attention.kv_lora_rank</td><td>q_lora_rank (0 for V2-Lite), kv_lora_rank</td></tr>
 *   <tr><td>attention.key_length / value_length</td><td>kv_lora_rank + qk_rope_head_dim / kv_lora_rank</td></tr>
 *   <tr><td>attention.key_length_mla / value_length_mla</td><td>qk_nope + qk_rope / v_head_dim</td></tr>
 *   <tr><td>rope.dimension_count, rope.freq_base</td><td>qk_rope_head_dim, rope_theta</td></tr>
 *   <tr><td>rope.scaling.{type, factor, original_context_length, yarn_beta_fast, yarn_beta_slow,
 *       yarn_log_multiplier}</td><td>YaRN; {@code yarn_log_multiplier = 0.1 * mscale_all_dim} (llama.cpp divides
 *       by 0.1 again and takes {@code mscale = mscale_all_dim})</td></tr>
 *   <tr><td>expert_count, expert_used_count, expert_shared_count, expert_feed_forward_length,
 *       leading_dense_block_count</td><td>n_routed_experts, num_experts_per_tok, n_shared_experts,
 *       moe_intermediate_size, first_k_dense_replace</td></tr>
 *   <tr><td>expert_gating_func</td><td>2 = sigmoid (V3), 1 = softmax (V2)</td></tr>
 *   <tr><td>expert_group_count / expert_group_used_count</td><td>n_group / topk_group (only when groups limit
 *       the choice)</td></tr>
 *   <tr><td>expert_weights_scale, expert_weights_norm</td><td>routed_scaling_factor, norm_topk_prob</td></tr>
 * </table>
 */
public final class DeepSeek2Metadata {

    public static final String ARCH = "deepseek2";
    static final String P = ARCH + ".";
    static final int GATING_SOFTMAX = 1;
    static final int GATING_SIGMOID = 2;

    private DeepSeek2Metadata() {}

    /** llama.cpp's {@code general.file_type} ({@code llama_ftype}) for a file whose matrices are {@code type}. */
    static int fileType(GgmlType type) {
        switch (type) {
            case F32:
                return 0;
            case F16:
                return 1;
            case Q4_0:
                return 2;
            case Q8_0:
                return 7;
            default:
                throw new IllegalArgumentException("no file type for " + type);
        }
    }

    /**
     * Writes the architecture's metadata for {@code c}.
     *
     * @throws IllegalArgumentException for a config llama.cpp's {@code deepseek2} cannot express (naming the field)
     */
    static void write(GgufWriter w, DeepSeekConfig c, String name, GgmlType type) {
        check(c);
        w.put("general.architecture", GgufValue.string(ARCH));
        w.put("general.type", GgufValue.string("model"));
        w.put("general.name", GgufValue.string(name));
        w.put("general.quantization_version", GgufValue.uint32(2));
        w.put("general.file_type", GgufValue.uint32(fileType(type)));
        w.put(P + "block_count", GgufValue.uint32(c.numHiddenLayers()));
        w.put(P + "context_length", GgufValue.uint32(c.maxPositionEmbeddings()));
        w.put(P + "embedding_length", GgufValue.uint32(c.hiddenSize()));
        w.put(P + "feed_forward_length", GgufValue.uint32(c.intermediateSize()));
        w.put(P + "vocab_size", GgufValue.uint32(c.vocabSize()));
        w.put(P + "attention.head_count", GgufValue.uint32(c.numAttentionHeads()));
        w.put(P + "attention.head_count_kv", GgufValue.uint32(1));
        w.put(P + "attention.layer_norm_rms_epsilon", GgufValue.float32(c.rmsNormEps()));
        // 0 for a model without a query compression (V2-Lite): llama.cpp requires the key unless it recognises a
        // Lite model by its layer count (26, 27, or 48 with a 128256 vocabulary), and with 0 loads attn_q instead
        w.put(P + "attention.q_lora_rank", GgufValue.uint32(c.qLoraRank().orElse(0)));
        w.put(P + "attention.kv_lora_rank", GgufValue.uint32(c.kvLoraRank()));
        w.put(P + "attention.key_length", GgufValue.uint32(c.kvLoraRank() + c.qkRopeHeadDim()));
        w.put(P + "attention.value_length", GgufValue.uint32(c.kvLoraRank()));
        w.put(P + "attention.key_length_mla", GgufValue.uint32(c.qkHeadDim()));
        w.put(P + "attention.value_length_mla", GgufValue.uint32(c.vHeadDim()));
        w.put(P + "rope.dimension_count", GgufValue.uint32(c.qkRopeHeadDim()));
        w.put(P + "rope.freq_base", GgufValue.float32(c.ropeTheta()));
        if (c.isYarn()) {
            w.put(P + "rope.scaling.type", GgufValue.string("yarn"));
            w.put(P + "rope.scaling.factor", GgufValue.float32(c.ropeFactor()));
            w.put(P + "rope.scaling.original_context_length", GgufValue.uint32(c.yarnOriginalContext()));
            w.put(P + "rope.scaling.yarn_beta_fast", GgufValue.float32(c.betaFast()));
            w.put(P + "rope.scaling.yarn_beta_slow", GgufValue.float32(c.betaSlow()));
            if (c.mscaleAllDim() != 0) {
                w.put(P + "rope.scaling.yarn_log_multiplier", GgufValue.float32(0.1 * c.mscaleAllDim()));
            }
        }
        w.put(P + "leading_dense_block_count", GgufValue.uint32(Math.min(c.firstKDenseReplace(),
                c.numHiddenLayers())));
        w.put(P + "expert_feed_forward_length", GgufValue.uint32(c.moeIntermediateSize()));
        w.put(P + "expert_shared_count", GgufValue.uint32(c.nSharedExperts()));
        if (c.nRoutedExperts() > 0) {
            w.put(P + "expert_count", GgufValue.uint32(c.nRoutedExperts()));
            w.put(P + "expert_used_count", GgufValue.uint32(c.numExpertsPerTok()));
            if (groupLimited(c)) {
                w.put(P + "expert_group_count", GgufValue.uint32(c.nGroup()));
                w.put(P + "expert_group_used_count", GgufValue.uint32(c.topkGroup()));
            }
            w.put(P + "expert_gating_func", GgufValue.uint32(c.isV3() ? GATING_SIGMOID : GATING_SOFTMAX));
            w.put(P + "expert_weights_scale", GgufValue.float32(c.routedScalingFactor()));
            // our V2 router (as transformers') normalises only with more than one expert per token
            boolean norm = c.normTopkProb() && (c.isV3() || c.numExpertsPerTok() > 1);
            w.put(P + "expert_weights_norm", GgufValue.bool(norm));
        }
    }

    private static boolean groupLimited(DeepSeekConfig c) {
        boolean grouped = c.isV3() || "group_limited_greedy".equals(c.topkMethod());
        return grouped && c.nGroup() > 1 && c.topkGroup() < c.nGroup();
    }

    /** Refuses what llama.cpp would compute differently, instead of writing a file that silently disagrees. */
    private static void check(DeepSeekConfig c) {
        if (!c.isV3() && groupLimited(c)) {
            throw new IllegalArgumentException("topk_method group_limited_greedy ranks groups by their best expert,"
                    + " llama.cpp's deepseek2 by the sum of the best two: it cannot express this DeepSeek-V2 router");
        }
        if (c.isYarn()) {
            double m = c.mscaleAllDim() != 1 && c.mscaleAllDim() != 0 ? c.mscaleAllDim() : 1;
            if (Math.abs(c.mscale() - m) > 1e-6 && !(c.mscale() == 0 && c.mscaleAllDim() == 0)) {
                throw new IllegalArgumentException("YaRN mscale " + c.mscale() + " with mscale_all_dim "
                        + c.mscaleAllDim() + ": llama.cpp's deepseek2 assumes mscale = mscale_all_dim (or 1)");
            }
            if (c.mscaleAllDim() == 0) {
                throw new IllegalArgumentException("YaRN without mscale_all_dim: llama.cpp's deepseek2 would scale"
                        + " attention by mscale^2, transformers does not");
            }
            if (c.yarnFactor() != c.ropeFactor()) {
                throw new IllegalArgumentException("YaRN factor " + c.ropeFactor() + " differs from "
                        + "max_position_embeddings / original_max_position_embeddings = " + c.yarnFactor()
                        + ": llama.cpp uses the factor, transformers the ratio");
            }
        }
    }

    /**
     * Reads a {@code deepseek2} file's metadata back into a config: sigmoid gating gives {@code deepseek_v3}
     * ({@code noaux_tc}), softmax gives {@code deepseek_v2}. llama.cpp's rotary embedding rotates adjacent pairs, as
     * our V2 and interleaved V3 do, so the config says {@code rope_interleave: true}.
     *
     * @throws GgufFormatException naming the file and key for another architecture or a missing or mistyped key
     */
    public static DeepSeekConfig config(GgufFile f) throws GgufFormatException {
        String arch = f.string("general.architecture").orElseThrow(() -> new GgufFormatException(f.path()
                + ": missing metadata 'general.architecture'"));
        if (!ARCH.equals(arch)) {
            throw new GgufFormatException(f.path() + ": architecture '" + arch + "' is not supported (only '" + ARCH
                    + "', DeepSeek-V2/V3)");
        }
        int experts = optUint(f, "expert_count").orElse((long) 0).intValue();
        int gating = optUint(f, "expert_gating_func").orElse((long) GATING_SOFTMAX).intValue();
        if (gating != GATING_SOFTMAX && gating != GATING_SIGMOID) {
            throw new GgufFormatException(f.path() + ": " + P + "expert_gating_func " + gating
                    + " is not supported (1 softmax or 2 sigmoid)");
        }
        boolean v3 = gating == GATING_SIGMOID;
        DeepSeekConfig.Builder b = DeepSeekConfig.builder(v3 ? DeepSeekConfig.DEEPSEEK_V3 : DeepSeekConfig.DEEPSEEK_V2);
        int layers = uint(f, "block_count");
        int heads = uint(f, "attention.head_count");
        int kvLora = uint(f, "attention.kv_lora_rank");
        int rope = uint(f, "rope.dimension_count");
        int keyMla = optUint(f, "attention.key_length_mla").isPresent() ? uint(f, "attention.key_length_mla")
                : uint(f, "attention.key_length");
        int valueMla = optUint(f, "attention.value_length_mla").isPresent() ? uint(f, "attention.value_length_mla")
                : uint(f, "attention.value_length");
        if (keyMla <= rope) {
            throw new GgufFormatException(f.path() + ": " + P + "attention.key_length_mla " + keyMla
                    + " must exceed rope.dimension_count " + rope);
        }
        b.vocabSize(vocabSize(f)).hiddenSize(uint(f, "embedding_length")).intermediateSize(uint(f,
                "feed_forward_length")).numHiddenLayers(layers).numAttentionHeads(heads).kvLoraRank(kvLora)
                .qkRopeHeadDim(rope).qkNopeHeadDim(keyMla - rope).vHeadDim(valueMla)
                .maxPositionEmbeddings(uint(f, "context_length"))
                .rmsNormEps(flt(f, "attention.layer_norm_rms_epsilon"))
                .ropeTheta(optFlt(f, "rope.freq_base").orElse(10000.0))
                .ropeInterleave(true)
                .tieWordEmbeddings(!f.tensors().containsKey("output.weight"));
        int qLora = optUint(f, "attention.q_lora_rank").orElse(0L).intValue();
        b.qLoraRank(qLora > 0 ? qLora : null);
        int dense = optUint(f, "leading_dense_block_count").orElse((long) 0).intValue();
        b.firstKDenseReplace(experts > 0 ? dense : layers);
        b.nRoutedExperts(experts);
        b.moeIntermediateSize(optUint(f, "expert_feed_forward_length").orElse((long) 1).intValue());
        b.nSharedExperts(optUint(f, "expert_shared_count").orElse((long) 0).intValue());
        if (experts > 0) {
            b.numExpertsPerTok(uint(f, "expert_used_count"));
            b.routedScalingFactor(optFlt(f, "expert_weights_scale").orElse(1.0));
            GgufValue norm = f.get(P + "expert_weights_norm").orElse(null);
            if (norm != null && norm.type() != GgufValueType.BOOL) {
                throw new GgufFormatException(f.path() + ": " + P + "expert_weights_norm is " + norm.type()
                        + ", expected BOOL");
            }
            b.normTopkProb(norm != null && norm.asBool());
            int groups = optUint(f, "expert_group_count").orElse((long) 0).intValue();
            int used = optUint(f, "expert_group_used_count").orElse((long) 0).intValue();
            if (groups > 1) {
                b.nGroup(groups).topkGroup(used);
                if (!v3) {
                    throw new GgufFormatException(f.path() + ": softmax gating with expert groups (DeepSeek-V2's"
                            + " group_limited_greedy as llama.cpp computes it, by the sum of each group's best two) is"
                            + " not supported");
                }
            } else {
                b.nGroup(1).topkGroup(1);
            }
        }
        b.topkMethod(v3 ? "noaux_tc" : "greedy");
        String scaling = f.string(P + "rope.scaling.type").orElse("none");
        if ("yarn".equals(scaling)) {
            double factor = flt(f, "rope.scaling.factor");
            int original = uint(f, "rope.scaling.original_context_length");
            double logMul = optFlt(f, "rope.scaling.yarn_log_multiplier").orElse(0.0) / 0.1;
            double mscale = logMul != 0 && logMul != 1 ? logMul : (logMul == 0 ? 0 : 1);
            b.yarn(factor, original, optFlt(f, "rope.scaling.yarn_beta_fast").orElse(32.0),
                    optFlt(f, "rope.scaling.yarn_beta_slow").orElse(1.0), mscale, logMul);
        } else if (!"none".equals(scaling)) {
            throw new GgufFormatException(f.path() + ": " + P + "rope.scaling.type '" + scaling
                    + "' is not supported (none or yarn)");
        }
        try {
            return b.build();
        } catch (IllegalArgumentException e) {
            throw new GgufFormatException(f.path() + ": metadata gives an invalid DeepSeek config: " + e.getMessage(),
                    e);
        }
    }

    private static int vocabSize(GgufFile f) throws GgufFormatException {
        Optional<Long> v = optUint(f, "vocab_size");
        if (v.isPresent()) {
            return v.get().intValue();
        }
        GgufValue tokens = f.get("tokenizer.ggml.tokens").orElse(null);
        if (tokens != null && tokens.type() == GgufValueType.ARRAY) {
            return tokens.asList().size();
        }
        long[] ne = f.tensor("token_embd.weight").ne();
        return (int) ne[1];
    }

    private static int uint(GgufFile f, String key) throws GgufFormatException {
        return optUint(f, key).orElseThrow(() -> new GgufFormatException(f.path() + ": missing metadata '" + P + key
                + "'")).intValue();
    }

    private static Optional<Long> optUint(GgufFile f, String key) throws GgufFormatException {
        GgufValue v = f.get(P + key).orElse(null);
        if (v == null) {
            return Optional.empty();
        }
        if (!(v.value() instanceof Long) || v.asLong() < 0 || v.asLong() > Integer.MAX_VALUE) {
            throw new GgufFormatException(f.path() + ": metadata '" + P + key + "' must be a non-negative integer, got "
                    + v);
        }
        return Optional.of(v.asLong());
    }

    private static double flt(GgufFile f, String key) throws GgufFormatException {
        return optFlt(f, key).orElseThrow(() -> new GgufFormatException(f.path() + ": missing metadata '" + P + key
                + "'"));
    }

    private static Optional<Double> optFlt(GgufFile f, String key) throws GgufFormatException {
        GgufValue v = f.get(P + key).orElse(null);
        if (v == null) {
            return Optional.empty();
        }
        if (v.type() != GgufValueType.FLOAT32 && v.type() != GgufValueType.FLOAT64) {
            throw new GgufFormatException(f.path() + ": metadata '" + P + key + "' is " + v.type().name()
                    .toLowerCase(Locale.ROOT) + ", expected FLOAT32");
        }
        // stored as float32: widen through the decimal form so that 1e-6 reads back as 1e-6, not 9.99999997e-7
        return Optional.of(Double.parseDouble(Float.toString((float) v.asDouble())));
    }
}
