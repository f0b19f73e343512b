package ai.djl.memopt.quantize;

/** How quantized values are chosen. */
public enum QuantMethod {
    /** Round to nearest on the weight alone. */
    RTN("rtn"),
    /**
     * Activation-aware weight quantization (AWQ, Lin et al. 2023): per input channel scales {@code s = mean|x|^alpha}
     * are searched on calibration activations so the layer output error is smallest; {@code Q(W diag(s)) diag(s)^-1}
     * is used instead of {@code Q(W)}. {@code alpha = 0} is RTN, so on the calibration data it is never worse.
     */
    AWQ("awq"),
    /**
     * GPTQ (Frantar et al. 2022): columns are quantized one by one and each rounding error is compensated on the
     * remaining columns through the inverse Hessian {@code 2 X^T X / n} of calibration activations, minimising the
     * layer output error. See {@link GptqSolver}.
     */
    GPTQ("gptq");

    private final String id;

    QuantMethod(String id) {
        this.id = id;
    }

    /** The short identifier ({@code "rtn"}, {@code "awq"}). */
    public String id() {
        return id;
    }

    /**
     * Parses an identifier.
     *
     * @throws IllegalArgumentException naming the unknown value and the known ones
     */
    public static QuantMethod fromId(String id) {
        return ShortIds.parse(values(), QuantMethod::id, "quantization method", id);
    }
}
