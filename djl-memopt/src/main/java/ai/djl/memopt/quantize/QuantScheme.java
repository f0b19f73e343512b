package ai.djl.memopt.quantize;

/** The weight-only quantization schemes, with the identifier used in configs, reports and artifacts. */
public enum QuantScheme {
    /** Symmetric int8, one FP32 scale per output channel: {@code q = round(w / s)}, {@code s = max|w_row| / 127}. */
    INT8_WEIGHT_ONLY("int8"),
    /**
     * Asymmetric uint4 with an integer zero point per group of {@code groupSize} consecutive input weights, two values
     * per byte (see {@link Int4Packing}).
     */
    INT4_WEIGHT_ONLY("int4");

    private final String id;

    QuantScheme(String id) {
        this.id = id;
    }

    /** The short identifier ({@code "int8"}, {@code "int4"}). */
    public String id() {
        return id;
    }

    /**
     * Parses an identifier.
     *
     * @throws IllegalArgumentException naming the unknown value and the known ones
     */
    public static QuantScheme fromId(String id) {
        return ShortIds.parse(values(), QuantScheme::id, "quantization scheme", id);
    }
}
