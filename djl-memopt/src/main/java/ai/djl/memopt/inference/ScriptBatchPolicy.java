package ai.djl.memopt.inference;

import ai.djl.Device;
import com.google.common.base.Preconditions;
import java.util.function.Predicate;

/**
 * Which sessions of a decoder whose layers qualify for the TorchScript step take it. {@link DecodePath#TORCHSCRIPT}
 * (or {@code -Dai.djl.memopt.decodePath=torchscript}): every session. {@link DecodePath#AUTO}: on a GPU, sessions of at
 * most {@link DecodePath#SCRIPT_MAX_BATCH_PROPERTY} sequences (default {@link DecodePath#DEFAULT_SCRIPT_MAX_BATCH}),
 * larger ones take the Java path; on the CPU every session. The choice is made per session and stage, when the session's
 * cache is created ({@code DecoderStage.Cache}).
 *
 * <p>Why: one H100, bench-small in FP16 (docs/benchmarks.md, third lease): the script decoded 1.83x the Java path's
 * tokens/s at batch 1 (host-bound), 0.62x at batch 8 and 0.56x at batch 32. Interpolating the ratio log-linearly in
 * log2(batch) between 1 and 8 crosses 1 near batch 3.2, hence 3. An estimate awaiting a GPU sweep at batch 1, 2, 4, 8.
 */
final class ScriptBatchPolicy {

    private final boolean everyBatch;
    private final int maxBatch;
    private final Predicate<Device> limited;

    /**
     * @param everyBatch the TorchScript step was asked for explicitly: every session takes it
     * @param maxBatch the largest batch that takes the step on a limited device under {@code AUTO} (0: none)
     * @param limited the devices the limit applies to ({@link Device#isGpu()}; tests pass others)
     */
    ScriptBatchPolicy(boolean everyBatch, int maxBatch, Predicate<Device> limited) {
        Preconditions.checkArgument(maxBatch >= 0, "maxBatch must be >= 0, got %s", maxBatch);
        this.everyBatch = everyBatch;
        this.maxBatch = maxBatch;
        this.limited = Preconditions.checkNotNull(limited, "limited");
    }

    /**
     * The policy of a decoder built for {@code wanted} ({@link DecodePath#withProperty()} applied), with the threshold
     * from {@link DecodePath#SCRIPT_MAX_BATCH_PROPERTY}.
     *
     * @throws IllegalArgumentException if the property is not an integer >= 0
     */
    static ScriptBatchPolicy of(DecodePath wanted) {
        return new ScriptBatchPolicy(wanted == DecodePath.TORCHSCRIPT, maxBatchProperty(), Device::isGpu);
    }

    /** {@link DecodePath#SCRIPT_MAX_BATCH_PROPERTY}, or its default when unset or blank. */
    static int maxBatchProperty() {
        String raw = System.getProperty(DecodePath.SCRIPT_MAX_BATCH_PROPERTY);
        if (raw == null || raw.isBlank()) {
            return DecodePath.DEFAULT_SCRIPT_MAX_BATCH;
        }
        int value;
        try {
            value = Integer.parseInt(raw.trim());
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException("system property " + DecodePath.SCRIPT_MAX_BATCH_PROPERTY
                    + " must be an integer >= 0 (the largest batch that takes the TorchScript decode step on a GPU),"
                    + " got '" + raw + "'", e);
        }
        Preconditions.checkArgument(value >= 0, "system property %s must be an integer >= 0 (the largest batch that"
                + " takes the TorchScript decode step on a GPU), got %s", DecodePath.SCRIPT_MAX_BATCH_PROPERTY, value);
        return value;
    }

    int maxBatch() {
        return maxBatch;
    }

    /** Why a session of {@code batch} sequences on {@code device} takes the Java path, or null if it takes the step. */
    String javaReason(Device device, int batch) {
        if (everyBatch || !limited.test(device) || batch <= maxBatch) {
            return null;
        }
        return "batch " + batch + " on " + device + " is above " + DecodePath.SCRIPT_MAX_BATCH_PROPERTY + " = "
                + maxBatch + " (DecodePath.AUTO)";
    }
}
