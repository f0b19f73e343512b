package ai.djl.memopt.quantize;

/**
 * Told by {@link Quantizer#quantize(ai.djl.nn.Block, QuantizationConfig, QuantizationProgress)} after each layer is
 * quantized: AWQ and GPTQ calibrate layer by layer, minutes on a real model, and a tool shows a progress bar.
 */
@FunctionalInterface
public interface QuantizationProgress {

    /** {@code done} of {@code total} layers (embedding tables included) are quantized, the last one at {@code path}. */
    void layerDone(int done, int total, String path);
}
