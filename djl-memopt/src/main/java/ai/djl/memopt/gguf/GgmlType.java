package ai.djl.memopt.gguf;

import java.util.Optional;

/**
 * The ggml tensor types this package reads or writes, with ggml's ids ({@code enum ggml_type} in {@code ggml.h}) and
 * block geometry: a row of {@code n} values takes {@code n / blockSize * blockBytes} bytes.
 *
 * <table>
 *   <caption>Block layouts (ggml-common.h)</caption>
 *   <tr><th>type</th><th>values per block</th><th>bytes</th><th>layout</th></tr>
 *   <tr><td>F32</td><td>1</td><td>4</td><td>IEEE binary32, little-endian</td></tr>
 *   <tr><td>F16</td><td>1</td><td>2</td><td>IEEE binary16</td></tr>
 *   <tr><td>BF16</td><td>1</td><td>2</td><td>bfloat16 (read only)</td></tr>
 *   <tr><td>Q8_0</td><td>32</td><td>34</td><td>{@code d} (f16), {@code qs[32]} (int8): {@code x = qs[j] * d}</td></tr>
 *   <tr><td>Q4_0</td><td>32</td><td>18</td><td>{@code d} (f16), {@code qs[16]}: value {@code j} in the low nibble of
 *       {@code qs[j]}, value {@code j + 16} in its high nibble; {@code x = (q - 8) * d}</td></tr>
 * </table>
 */
public enum GgmlType {
    F32(0, 1, 4),
    F16(1, 1, 2),
    Q4_0(2, 32, 18),
    Q8_0(8, 32, 34),
    BF16(30, 1, 2);

    private final int id;
    private final int blockSize;
    private final int blockBytes;

    GgmlType(int id, int blockSize, int blockBytes) {
        this.id = id;
        this.blockSize = blockSize;
        this.blockBytes = blockBytes;
    }

    /** ggml's numeric id. */
    public int id() {
        return id;
    }

    /** Values per block. */
    public int blockSize() {
        return blockSize;
    }

    /** Bytes per block. */
    public int blockBytes() {
        return blockBytes;
    }

    /** Whether this is a block-quantized type. */
    public boolean isQuantized() {
        return blockSize > 1;
    }

    /**
     * Bytes of a row of {@code n} values.
     *
     * @throws IllegalArgumentException if {@code n} is not a multiple of the block size
     */
    public long rowBytes(long n) {
        if (n % blockSize != 0) {
            throw new IllegalArgumentException(this + " rows need a multiple of " + blockSize + " values, got " + n);
        }
        return n / blockSize * blockBytes;
    }

    /** The type with ggml id {@code id}, if this package knows it. */
    public static Optional<GgmlType> fromId(int id) {
        for (GgmlType t : values()) {
            if (t.id == id) {
                return Optional.of(t);
            }
        }
        return Optional.empty();
    }

    /** ggml's name of an id, also for the types this package does not read (for error messages). */
    public static String nameOf(int id) {
        String[] names = {"F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
            "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
            "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16"};
        return id >= 0 && id < names.length ? names[id] : "unknown";
    }
}
