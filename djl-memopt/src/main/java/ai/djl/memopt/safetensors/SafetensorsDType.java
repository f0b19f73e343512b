package ai.djl.memopt.safetensors;

import ai.djl.ndarray.types.DataType;

/** The element types of the safetensors format, with the DJL type each one is loaded as. */
public enum SafetensorsDType {
    F64(8, DataType.FLOAT64),
    F32(4, DataType.FLOAT32),
    F16(2, DataType.FLOAT16),
    /** Loaded as FLOAT32 (converted in Java): DJL 0.36 aborts the JVM on BFLOAT16. */
    BF16(2, DataType.FLOAT32),
    I64(8, DataType.INT64),
    I32(4, DataType.INT32),
    /** Loaded as INT32 (converted in Java): DJL 0.36 aborts the JVM on INT16. */
    I16(2, DataType.INT32),
    I8(1, DataType.INT8),
    U8(1, DataType.UINT8),
    BOOL(1, DataType.BOOLEAN);

    private final int byteSize;
    private final DataType loadedAs;

    SafetensorsDType(int byteSize, DataType loadedAs) {
        this.byteSize = byteSize;
        this.loadedAs = loadedAs;
    }

    /** Bytes per element. */
    public int byteSize() {
        return byteSize;
    }

    /** The DJL type {@link SafetensorsFile#load} gives for this type (never BFLOAT16 or INT16). */
    public DataType loadedAs() {
        return loadedAs;
    }

    /** Whether values convert to {@code float} ({@link SafetensorsFile#readFloats}). */
    public boolean isFloating() {
        return this == F64 || this == F32 || this == F16 || this == BF16;
    }

    /**
     * The safetensors type of a DJL array type.
     *
     * @throws IllegalArgumentException for types this project never writes (BFLOAT16 cannot exist in DJL 0.36)
     */
    public static SafetensorsDType of(DataType type) {
        switch (type) {
            case FLOAT64:
                return F64;
            case FLOAT32:
                return F32;
            case FLOAT16:
                return F16;
            case INT64:
                return I64;
            case INT32:
                return I32;
            case INT8:
                return I8;
            case UINT8:
                return U8;
            case BOOLEAN:
                return BOOL;
            default:
                throw new IllegalArgumentException("no safetensors type for DJL data type " + type);
        }
    }

    /** Parses the {@code dtype} field of a header entry; {@code null} if the name is not one of these. */
    static SafetensorsDType parse(String name) {
        for (SafetensorsDType t : values()) {
            if (t.name().equals(name)) {
                return t;
            }
        }
        return null;
    }
}
