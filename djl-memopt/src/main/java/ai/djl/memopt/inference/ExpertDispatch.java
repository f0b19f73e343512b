package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekMoE;
import java.util.Locale;

/**
 * How {@link MlaCachedDecoder} runs the routed experts of DeepSeek MoE layers during decoding.
 *
 * <ul>
 *   <li>{@link #GATHERED}: {@link DeepSeekMoE#enableGatheredDispatch()}: a decode step whose {@code B x k}
 *       assignments are within {@link DeepSeekMoE#gatheredDispatchLimit()} gathers the chosen experts' weights on the
 *       device by the id tensor, so the step reads nothing back but the sampled ids. It copies one expert matrix per
 *       assignment and projection.
 *   <li>{@link #SORTED}: the sorted dispatch at every call: one device-to-host read of the chosen expert ids per MoE
 *       layer and call; each hit expert's weights are read in place.
 *   <li>{@link #AUTO} (default): the system property {@value #PROPERTY} ({@code gathered} or {@code sorted}) if set,
 *       else {@code GATHERED} on a GPU, where a host read stalls the device's queue, and {@code SORTED} on the CPU,
 *       where a read has no queue to drain and the copies only cost (measured: see docs/inference.md).
 * </ul>
 */
public enum ExpertDispatch {
    AUTO,
    GATHERED,
    SORTED;

    /** System property that {@link #AUTO} follows when set: {@code gathered}, {@code sorted} or {@code auto}. */
    public static final String PROPERTY = "ai.djl.memopt.expertDispatch";

    /** {@code GATHERED} or {@code SORTED} for a decoder on {@code device}. */
    public ExpertDispatch resolve(Device device) {
        if (this != AUTO) {
            return this;
        }
        String forced = System.getProperty(PROPERTY, "auto").trim().toLowerCase(Locale.ROOT);
        switch (forced) {
            case "gathered":
                return GATHERED;
            case "sorted":
                return SORTED;
            case "auto":
            case "":
                return device.isGpu() ? GATHERED : SORTED;
            default:
                throw new IllegalArgumentException(
                        "system property " + PROPERTY + " must be gathered, sorted or auto, got '" + forced + "'");
        }
    }
}
