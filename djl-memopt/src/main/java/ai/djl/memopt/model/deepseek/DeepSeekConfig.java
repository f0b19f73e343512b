package ai.djl.memopt.model.deepseek;

import java.io.IOException;
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
        return DeepSeekConfigJson.read(DeepSeekConfigJson.write(this));
    }

    /**
     * Reads a Hugging Face {@code config.json}.
     *
     * @throws IOException if the file cannot be read
     * @throws IllegalArgumentException naming the file, the field and the value when it is malformed or unsupported
     */
    public static DeepSeekConfig fromJson(Path configJson) throws IOException {
        return DeepSeekConfigJson.read(configJson);
    }

    /** Parses the text of a {@code config.json}. */
    public static DeepSeekConfig fromJsonString(String json) {
        return DeepSeekConfigJson.read(json);
    }

    /**
     * A named architecture: {@code bench-tiny} (V3 style, a few million parameters, a training step well under a second
     * on CPU), {@code bench-small} (V3 style, 284,301,312 parameters) or {@code deepseek-v2-lite} (the shape of
     * DeepSeek-V2-Lite, about 15.7B parameters).
     */
    public static DeepSeekConfig preset(String name) {
        return DeepSeekPresets.preset(name);
    }

    // ---------------------------------------------------------------- writing

    /** A Hugging Face compatible {@code config.json} text that {@link #fromJsonString} reads back equal. */
    public String toJson() {
        return DeepSeekConfigJson.toJson(this);
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

    public String modelType() { return modelType; }
    public int vocabSize() { return vocabSize; }
    public int hiddenSize() { return hiddenSize; }
    public int intermediateSize() { return intermediateSize; }
    public int moeIntermediateSize() { return moeIntermediateSize; }
    public int numHiddenLayers() { return numHiddenLayers; }
    public int numAttentionHeads() { return numAttentionHeads; }

    /** {@code q_lora_rank}, empty when the config has {@code null} (a single {@code q_proj}). */
    public OptionalInt qLoraRank() {
        return qLoraRank == null ? OptionalInt.empty() : OptionalInt.of(qLoraRank);
    }

    public int kvLoraRank() { return kvLoraRank; }
    public int qkNopeHeadDim() { return qkNopeHeadDim; }
    public int qkRopeHeadDim() { return qkRopeHeadDim; }
    public int vHeadDim() { return vHeadDim; }
    public int nRoutedExperts() { return nRoutedExperts; }
    public int nSharedExperts() { return nSharedExperts; }
    public int numExpertsPerTok() { return numExpertsPerTok; }
    public int nGroup() { return nGroup; }
    public int topkGroup() { return topkGroup; }
    public double routedScalingFactor() { return routedScalingFactor; }
    public boolean normTopkProb() { return normTopkProb; }
    public int firstKDenseReplace() { return firstKDenseReplace; }
    public double rmsNormEps() { return rmsNormEps; }
    public double ropeTheta() { return ropeTheta; }

    /** {@code default} or {@code yarn}. */
    public String ropeType() { return ropeType; }
    public double ropeFactor() { return ropeFactor; }

    /** YaRN's {@code original_max_position_embeddings}, or 0 when not given. */
    public int originalMaxPositionEmbeddings() {
        return originalMaxPositionEmbeddings == null ? 0 : originalMaxPositionEmbeddings;
    }

    /** YaRN's {@code original_max_position_embeddings} as configured (null: not given). */
    Integer originalMaxPositionEmbeddingsOrNull() {
        return originalMaxPositionEmbeddings;
    }

    /** YaRN's explicit {@code attention_factor} (null: derived from mscale). */
    Double attentionFactorOrNull() {
        return attentionFactor;
    }

    public double betaFast() { return betaFast; }
    public double betaSlow() { return betaSlow; }
    public double mscale() { return mscale; }
    public double mscaleAllDim() { return mscaleAllDim; }
    public boolean ropeInterleave() { return ropeInterleave; }
    public boolean tieWordEmbeddings() { return tieWordEmbeddings; }
    public int maxPositionEmbeddings() { return maxPositionEmbeddings; }
    public String hiddenAct() { return hiddenAct; }

    /** V3: {@code noaux_tc}; V2: {@code greedy} or {@code group_limited_greedy}. */
    public String topkMethod() { return topkMethod; }
    public double initializerRange() { return initializerRange; }

    @Override
    public boolean equals(Object o) {
        if (this == o) {
            return true;
        }
        if (!(o instanceof DeepSeekConfig)) {
            return false;
        }
        return DeepSeekConfigJson.write(this).equals(DeepSeekConfigJson.write((DeepSeekConfig) o));
    }

    @Override
    public int hashCode() {
        return DeepSeekConfigJson.write(this).hashCode();
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
            DeepSeekPresets.modelTypeDefaults(this, modelType);
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
            DeepSeekConfig config = new DeepSeekConfig(this);
            DeepSeekConfigValidation.validate(config);
            return config;
        }
    }
}
