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
 *       otherwise.
 * </ul>
 */
public enum DecodePath {
    AUTO,
    TORCHSCRIPT,
    JAVA;

    /** System property that {@link #AUTO} follows when set: {@code torchscript}, {@code java} or {@code auto}. */
    public static final String PROPERTY = "ai.djl.memopt.decodePath";

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
