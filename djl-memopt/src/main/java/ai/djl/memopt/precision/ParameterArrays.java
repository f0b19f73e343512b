package ai.djl.memopt.precision;

import ai.djl.ndarray.NDArray;
import ai.djl.nn.Parameter;
import java.lang.reflect.Field;

/** Swaps the array behind a DJL {@link Parameter}: {@code Parameter.setArray} refuses once a shape is set. */
public final class ParameterArrays {

    private static final Field ARRAY;

    static {
        try {
            ARRAY = Parameter.class.getDeclaredField("array");
            ARRAY.setAccessible(true);
        } catch (NoSuchFieldException e) {
            throw new ExceptionInInitializerError(e);
        }
    }

    private ParameterArrays() {}

    /** Makes {@code array} the parameter's array (the caller owns the old one). */
    public static void swap(Parameter parameter, NDArray array) {
        try {
            ARRAY.set(parameter, array);
        } catch (IllegalAccessException e) {
            throw new IllegalStateException("cannot set the array of parameter " + parameter.getName(), e);
        }
    }
}
