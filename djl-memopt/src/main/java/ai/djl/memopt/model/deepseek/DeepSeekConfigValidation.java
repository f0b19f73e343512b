package ai.djl.memopt.model.deepseek;

/**
 * The ranges and combinations a {@link DeepSeekConfig} must satisfy for this implementation to compute what Hugging
 * Face computes; {@link DeepSeekConfig.Builder#build()} runs it. Every failure names the field and the value.
 */
final class DeepSeekConfigValidation {

    private DeepSeekConfigValidation() {}

    /**
     * Checks every field of {@code c}.
     *
     * @throws IllegalArgumentException naming the field and value the model cannot honour
     */
    static void validate(DeepSeekConfig c) {
        positive("vocab_size", c.vocabSize());
        positive("hidden_size", c.hiddenSize());
        positive("intermediate_size", c.intermediateSize());
        positive("num_hidden_layers", c.numHiddenLayers());
        positive("num_attention_heads", c.numAttentionHeads());
        positive("kv_lora_rank", c.kvLoraRank());
        positive("qk_nope_head_dim", c.qkNopeHeadDim());
        positive("qk_rope_head_dim", c.qkRopeHeadDim());
        positive("v_head_dim", c.vHeadDim());
        if (c.qLoraRank().isPresent()) {
            positive("q_lora_rank", c.qLoraRank().getAsInt());
        }
        check(c.qkRopeHeadDim() % 2 == 0, "qk_rope_head_dim", c.qkRopeHeadDim(), "must be even");
        check(c.nRoutedExperts() >= 0, "n_routed_experts", c.nRoutedExperts(), "must be >= 0");
        check(c.firstKDenseReplace() >= 0, "first_k_dense_replace", c.firstKDenseReplace(), "must be >= 0");
        if (c.nRoutedExperts() > 0 && c.firstKDenseReplace() < c.numHiddenLayers()) {
            positive("moe_intermediate_size", c.moeIntermediateSize());
            positive("num_experts_per_tok", c.numExpertsPerTok());
            check(c.nSharedExperts() >= 0, "n_shared_experts", c.nSharedExperts(), "must be >= 0");
            check(c.numExpertsPerTok() <= c.nRoutedExperts(), "num_experts_per_tok", c.numExpertsPerTok(),
                    "exceeds n_routed_experts " + c.nRoutedExperts());
        }
        check("silu".equals(c.hiddenAct()), "hidden_act", c.hiddenAct(), "only silu is supported");
        check(c.rmsNormEps() > 0, "rms_norm_eps", c.rmsNormEps(), "must be > 0");
        check(c.ropeTheta() > 0, "rope_theta", c.ropeTheta(), "must be > 0");
        if (c.isV3()) {
            check("noaux_tc".equals(c.topkMethod()), "topk_method", c.topkMethod(),
                    "deepseek_v3 supports only noaux_tc (sigmoid scores with e_score_correction_bias)");
            if (c.nRoutedExperts() > 0) {
                checkGroups(c);
                check(c.nRoutedExperts() / c.nGroup() >= 2, "n_group", c.nGroup(),
                        "needs at least 2 experts per group (group score is the sum of the top 2)");
            }
        } else {
            check("greedy".equals(c.topkMethod()) || "group_limited_greedy".equals(c.topkMethod()), "topk_method",
                    c.topkMethod(), "deepseek_v2 supports greedy or group_limited_greedy");
            if ("group_limited_greedy".equals(c.topkMethod()) && c.nRoutedExperts() > 0) {
                checkGroups(c);
            }
        }
        if (c.isYarn()) {
            check(c.ropeFactor() > 0, "rope factor", c.ropeFactor(), "must be > 0");
            if (c.originalMaxPositionEmbeddingsOrNull() != null) {
                positive("original_max_position_embeddings", c.originalMaxPositionEmbeddingsOrNull());
            }
            check(c.betaFast() > c.betaSlow(), "beta_fast", c.betaFast(), "must exceed beta_slow " + c.betaSlow());
        }
        positive("max_position_embeddings", c.maxPositionEmbeddings());
    }

    /** Routed experts split evenly into {@code n_group} groups, of which {@code topk_group} are chosen. */
    private static void checkGroups(DeepSeekConfig c) {
        positive("n_group", c.nGroup());
        check(c.nRoutedExperts() % c.nGroup() == 0, "n_routed_experts", c.nRoutedExperts(),
                "not divisible by n_group " + c.nGroup());
        check(c.topkGroup() >= 1 && c.topkGroup() <= c.nGroup(), "topk_group", c.topkGroup(),
                "must be in 1..n_group " + c.nGroup());
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
