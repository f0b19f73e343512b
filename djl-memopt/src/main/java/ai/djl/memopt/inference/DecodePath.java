package ai.djl.memopt.inference;

import java.util.Locale;

/**
 * How {@link MlaCachedDecoder} runs a step's decoder layers.
 *
 * <ul>
 *   <li>{@link #TORCHSCRIPT}: each stage's layers in one TorchScript call, generated and compiled at runtime (no
 *       Python): libtorch dispatches the ~140 operations per layer in C++ instead of one Java and JNI round trip per
 *       DJL operation. Plain layers only (FP32 or FP16 {@code Linear} weights, the model's own blocks); asking for it
 *       on another model throws.
 *   <li>{@link #JAVA}: the model's blocks called from Java, one DJL operation at a time: works with every decorator
 *       (quantized, LoRA, precision, checkpointing).
 *   <li>{@link #AUTO} (default): the system property {@value #PROPERTY} ({@code torchscript}, {@code java} or
 *       {@code auto}) if set, else {@code TORCHSCRIPT} where every layer of every stage qualifies and {@code JAVA}
 *       otherwise; and then, per session, on a GPU only sessions of at most {@value #SCRIPT_MAX_BATCH_PROPERTY}
 *       sequences (default {@value #DEFAULT_SCRIPT_MAX_BATCH}) take the TorchScript step, larger ones the Java path. On
 *       the CPU every session takes it. {@code MlaCachedDecoder.Session#decodePath()} says which one a session runs.
 * </ul>
 *
 * <p>The batch threshold is an estimate from one H100 measurement (bench-small FP16: the script 1.83x the Java path at
 * batch 1, 0.62x at batch 8; the log-linear interpolation crosses near batch 3), awaiting a sweep at 1, 2, 4 and 8.
 */
public enum DecodePath {
    AUTO,
    TORCHSCRIPT,
    JAVA;

    /** System property that {@link #AUTO} follows when set: {@code torchscript}, {@code java} or {@code auto}. */
    public static final String PROPERTY = "ai.djl.memopt.decodePath";

    /**
     * System property: the largest batch whose sessions take the TorchScript step on a GPU under {@link #AUTO} (an
     * integer >= 0; 0 sends every GPU session to the Java path). Ignored on the CPU and when {@link #TORCHSCRIPT} is
     * asked for.
     */
    public static final String SCRIPT_MAX_BATCH_PROPERTY = "ai.djl.memopt.decode.scriptMaxBatch";

    /** The default of {@link #SCRIPT_MAX_BATCH_PROPERTY}. */
    public static final int DEFAULT_SCRIPT_MAX_BATCH = 3;

    /** {@code AUTO} resolved against the system property: still {@code AUTO} unless the property forces a path. */
    DecodePath withProperty() {
        if (this != AUTO) {
            return this;
        }
        String forced = System.getProperty(PROPERTY, "auto").trim().toLowerCase(Locale.ROOT);
        switch (forced) {
            case "torchscript":
                return TORCHSCRIPT;
            case "java":
                return JAVA;
            case "auto":
            case "":
                return AUTO;
            default:
                throw new IllegalArgumentException(
                        "system property " + PROPERTY + " must be torchscript, java or auto, got '" + forced + "'");
        }
    }
}
