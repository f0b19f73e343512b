package ai.djl.memopt.model.deepseek;

/**
 * The named architectures of {@link DeepSeekConfig#preset(String)}, and the Hugging Face defaults of each
 * {@code model_type} that {@link DeepSeekConfig#builder(String)} starts from.
 */
final class DeepSeekPresets {

    private DeepSeekPresets() {}

    /**
     * A named architecture: {@code bench-tiny} (V3 style, a few million parameters, a training step well under a second
     * on CPU), {@code bench-small} (V3 style, 284,301,312 parameters) or {@code deepseek-v2-lite} (the shape of
     * DeepSeek-V2-Lite, about 15.7B parameters).
     */
    static DeepSeekConfig preset(String name) {
        switch (name) {
            case "bench-tiny":
                return DeepSeekConfig.builder(DeepSeekConfig.DEEPSEEK_V3)
                        .vocabSize(4096).hiddenSize(256).intermediateSize(704).moeIntermediateSize(128)
                        .numHiddenLayers(4).numAttentionHeads(4).qLoraRank(96).kvLoraRank(64)
                        .qkNopeHeadDim(32).qkRopeHeadDim(16).vHeadDim(32).nRoutedExperts(8).nSharedExperts(1)
                        .numExpertsPerTok(2).nGroup(2).topkGroup(1).routedScalingFactor(2.5).normTopkProb(true)
                        .firstKDenseReplace(1).maxPositionEmbeddings(2048).tieWordEmbeddings(false).build();
            case "bench-small":
                return DeepSeekConfig.builder(DeepSeekConfig.DEEPSEEK_V3)
                        .vocabSize(32000).hiddenSize(1024).intermediateSize(2816).moeIntermediateSize(512)
                        .numHiddenLayers(8).numAttentionHeads(16).nRoutedExperts(16).nSharedExperts(1)
                        .numExpertsPerTok(4).nGroup(4).topkGroup(2).routedScalingFactor(2.5).normTopkProb(true)
                        .qLoraRank(384).kvLoraRank(256).qkNopeHeadDim(64).qkRopeHeadDim(32).vHeadDim(64)
                        .firstKDenseReplace(1).maxPositionEmbeddings(4096).tieWordEmbeddings(false).build();
            case "deepseek-v2-lite":
                return DeepSeekConfig.builder(DeepSeekConfig.DEEPSEEK_V2)
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

    /**
     * Sets on a fresh builder the defaults of its {@code model_type} where V3 and V2 differ, as transformers'
     * {@code DeepseekV3Config} and {@code DeepseekV2Config} have them (the defaults they share are the builder's field
     * initialisers).
     */
    static void modelTypeDefaults(DeepSeekConfig.Builder b, String modelType) {
        if (DeepSeekConfig.DEEPSEEK_V3.equals(modelType)) {
            b.nSharedExperts(1).nGroup(8).topkGroup(4).routedScalingFactor(2.5).normTopkProb(true)
                    .firstKDenseReplace(3).maxPositionEmbeddings(4096).topkMethod("noaux_tc");
        } else {
            b.nSharedExperts(2).nGroup(1).topkGroup(1).routedScalingFactor(1.0).normTopkProb(false)
                    .firstKDenseReplace(0).maxPositionEmbeddings(2048).topkMethod("greedy");
        }
    }
}
