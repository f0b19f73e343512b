package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;

/** The quantize/dequantize arithmetic of one scheme (one handler per scheme, as in torchao). */
interface SchemeHandler {

    /**
     * Quantizes {@code weight (out, in)} (times {@code inputScales} per column when given); the result is attached to
     * the weight's manager, temporaries are freed.
     */
    QuantizedTensor quantize(NDArray weight, int groupSize, NDArray inputScales);

    /**
     * Quantize-then-dequantize of an FP32 {@code (out, in)} weight in float, without packing: what {@link #quantize}
     * followed by {@link #dequantize} gives, for searches that try many candidates. Attached to {@code w}'s manager.
     */
    NDArray fakeQuantize(NDArray w, int groupSize);

    /**
     * FP32 {@code (..., out, in)} without the AWQ input scales, from this scheme's arrays with any leading dimensions
     * (one weight {@code (out, in)}, or stacked experts {@code (E, out, in)}); temporaries and the result are attached
     * to {@code manager}.
     */
    NDArray dequantize(NDArray data, NDArray scales, NDArray zeros, int groupSize, NDManager manager);

    static SchemeHandler of(QuantScheme scheme) {
        switch (scheme) {
            case INT8_WEIGHT_ONLY:
                return Int8WeightOnlyHandler.INSTANCE;
            case INT4_WEIGHT_ONLY:
                return Int4WeightOnlyHandler.INSTANCE;
            default:
                throw new IllegalArgumentException("no handler for scheme " + scheme);
        }
    }
}
