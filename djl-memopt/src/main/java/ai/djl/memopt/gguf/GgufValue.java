package ai.djl.memopt.gguf;

import com.google.common.base.Preconditions;
import java.util.List;

/**
 * One GGUF metadata value with its exact type (llama.cpp checks types: a count written as INT32 where it reads
 * UINT32 fails to load). Scalars hold a boxed Java value ({@code Long} for every integer type, {@code Float},
 * {@code Double}, {@code Boolean}, {@code String}); arrays hold a {@code List} of such values and their element type.
 */
public final class GgufValue {

    private final GgufValueType type;
    private final GgufValueType elementType;
    private final Object value;

    private GgufValue(GgufValueType type, GgufValueType elementType, Object value) {
        this.type = type;
        this.elementType = elementType;
        this.value = value;
    }

    public static GgufValue uint32(long v) {
        Preconditions.checkArgument(v >= 0 && v <= 0xffffffffL, "%s does not fit UINT32", v);
        return new GgufValue(GgufValueType.UINT32, null, v);
    }

    public static GgufValue int32(long v) {
        return new GgufValue(GgufValueType.INT32, null, (long) (int) v);
    }

    public static GgufValue float32(double v) {
        return new GgufValue(GgufValueType.FLOAT32, null, (float) v);
    }

    public static GgufValue bool(boolean v) {
        return new GgufValue(GgufValueType.BOOL, null, v);
    }

    public static GgufValue string(String v) {
        return new GgufValue(GgufValueType.STRING, null, Preconditions.checkNotNull(v));
    }

    /** An array of {@code elementType} values (strings, or boxed numbers as {@link #of} would hold them). */
    public static GgufValue array(GgufValueType elementType, List<?> values) {
        Preconditions.checkArgument(elementType != GgufValueType.ARRAY, "nested arrays are not supported");
        return new GgufValue(GgufValueType.ARRAY, elementType, List.copyOf(values));
    }

    static GgufValue of(GgufValueType type, GgufValueType elementType, Object value) {
        return new GgufValue(type, elementType, value);
    }

    public GgufValueType type() {
        return type;
    }

    /** The element type of an array, else null. */
    public GgufValueType elementType() {
        return elementType;
    }

    /** The Java value (see the class comment). */
    public Object value() {
        return value;
    }

    /** An integer value of any integer type. */
    public long asLong() {
        Preconditions.checkState(value instanceof Long, "not an integer: %s %s", type, value);
        return (Long) value;
    }

    /** A FLOAT32/FLOAT64 value (or an integer, widened). */
    public double asDouble() {
        Preconditions.checkState(value instanceof Number, "not a number: %s %s", type, value);
        return ((Number) value).doubleValue();
    }

    public boolean asBool() {
        Preconditions.checkState(value instanceof Boolean, "not a bool: %s %s", type, value);
        return (Boolean) value;
    }

    public String asString() {
        Preconditions.checkState(value instanceof String, "not a string: %s %s", type, value);
        return (String) value;
    }

    /** The elements of an array. */
    public List<?> asList() {
        Preconditions.checkState(value instanceof List, "not an array: %s", type);
        return (List<?>) value;
    }

    @Override
    public String toString() {
        if (type == GgufValueType.ARRAY) {
            List<?> l = asList();
            return "[" + elementType + " x " + l.size() + "]";
        }
        return type + " " + value;
    }
}
