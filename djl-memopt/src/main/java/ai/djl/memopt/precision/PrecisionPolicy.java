package ai.djl.memopt.precision;

import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.norm.BatchNorm;
import ai.djl.nn.norm.LayerNorm;
import com.google.common.base.Preconditions;
import java.util.Locale;
import java.util.function.BiPredicate;

/**
 * Which parts of a model run in the compute type (FP16) and which stay in FP32, for {@link MixedPrecisionBlock}.
 * Immutable.
 *
 * <p>Defaults keep in FP32 the blocks whose numerics FP16 breaks: normalisations (DJL {@link LayerNorm},
 * {@link BatchNorm}, and any block whose class name contains {@code Norm}, e.g. an RMSNorm), softmax blocks (class or
 * name containing {@code softmax}) and MoE routers (a block named {@code gate} whose class is not a plain projection
 * of an MLP: the DeepSeek router is {@code mlp.gate}, its experts' {@code gate_proj} is not matched). The loss is
 * outside the model: {@link MixedPrecisionBlock} returns FP32 outputs by default so it is computed in FP32.
 *
 * <pre>{@code
 * PrecisionPolicy policy = PrecisionPolicy.builder()
 *         .optKeepFp32((path, block) -> path.endsWith("lm_head"))   // in addition to the defaults
 *         .build();
 * }</pre>
 */
public final class PrecisionPolicy {

    private static final BiPredicate<String, Block> DEFAULT_FP32 = PrecisionPolicy::isPrecisionSensitive;

    private final DataType computeType;
    private final BiPredicate<String, Block> keepFp32;
    private final boolean fp32Outputs;
    private final BiPredicate<String, Block> islandKeepsFp32Output;

    private PrecisionPolicy(Builder b) {
        this.computeType = b.computeType;
        this.keepFp32 = b.keepFp32;
        this.fp32Outputs = b.fp32Outputs;
        this.islandKeepsFp32Output = b.islandKeepsFp32Output;
    }

    /** FP16 compute, default FP32 islands, FP32 outputs. */
    public static PrecisionPolicy defaults() {
        return builder().build();
    }

    public static Builder builder() {
        return new Builder();
    }

    /** The type the decorated block computes in (FP16). */
    public DataType computeType() {
        return computeType;
    }

    /** Whether the block at {@code path} (relative to the decorated block) stays FP32. */
    public boolean keepFp32(String path, Block block) {
        return keepFp32.test(path, block);
    }

    /** Whether floating outputs are cast back to FP32. */
    public boolean fp32Outputs() {
        return fp32Outputs;
    }

    /**
     * Whether the FP32 island at {@code path} hands its output on in FP32 instead of casting it back to FP16: for
     * islands whose consumers want FP32 (the LM head, whose logits feed an FP32 softmax/loss). Default: paths ending in
     * {@code lm_head}.
     */
    public boolean islandKeepsFp32Output(String path, Block block) {
        return islandKeepsFp32Output.test(path, block);
    }

    /** The default test: norms, softmax blocks and routers named {@code gate}. */
    public static boolean isPrecisionSensitive(String path, Block block) {
        String cls = block.getClass().getSimpleName();
        String name = path.substring(path.lastIndexOf('.') + 1).toLowerCase(Locale.ROOT);
        return block instanceof LayerNorm
                || block instanceof BatchNorm
                || cls.contains("Norm")
                || cls.toLowerCase(Locale.ROOT).contains("softmax")
                || name.contains("softmax")
                || name.equals("gate")
                || cls.contains("Router")
                || cls.equals("MoEGate");
    }

    /** Builder; every option has a default. */
    public static final class Builder {
        private DataType computeType = DataType.FLOAT16;
        private BiPredicate<String, Block> keepFp32 = DEFAULT_FP32;
        private boolean fp32Outputs = true;
        private BiPredicate<String, Block> islandKeepsFp32Output = (path, block) -> path.endsWith("lm_head");

        private Builder() {}

        /** Which FP32 islands keep their output in FP32 (default: paths ending in {@code lm_head}). */
        public Builder optIslandKeepsFp32Output(BiPredicate<String, Block> predicate) {
            Preconditions.checkNotNull(predicate, "predicate");
            this.islandKeepsFp32Output = predicate;
            return this;
        }

        /**
         * The compute type; only {@link DataType#FLOAT16} is meaningful.
         *
         * @throws UnsupportedOperationException for BF16 (DJL 0.36 aborts the JVM on it)
         */
        public Builder optComputeType(DataType type) {
            Precisions.checkSupported(type);
            Preconditions.checkArgument(
                    type == DataType.FLOAT16, "mixed precision computes in FLOAT16, got %s", type);
            this.computeType = type;
            return this;
        }

        /** Keeps in FP32 the blocks matching {@code predicate} in addition to the defaults. */
        public Builder optKeepFp32(BiPredicate<String, Block> predicate) {
            Preconditions.checkNotNull(predicate, "predicate");
            this.keepFp32 = this.keepFp32.or(predicate);
            return this;
        }

        /** Replaces the FP32 test entirely (the defaults are dropped). */
        public Builder setKeepFp32(BiPredicate<String, Block> predicate) {
            Preconditions.checkNotNull(predicate, "predicate");
            this.keepFp32 = predicate;
            return this;
        }

        /** Whether floating outputs are cast back to FP32 (default true). */
        public Builder optFp32Outputs(boolean fp32Outputs) {
            this.fp32Outputs = fp32Outputs;
            return this;
        }

        public PrecisionPolicy build() {
            return new PrecisionPolicy(this);
        }
    }
}
