package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;

/**
 * DJL attaches an op's result to its first operand's manager, so chaining ops on a caller's array leaves every
 * intermediate in the caller's manager until it closes. Every computation here starts with a copy attached to a
 * temporary manager, and chains on that.
 */
final class Temps {

    private Temps() {}

    /** A copy of {@code a} as {@code type}, attached to {@code manager}. */
    static NDArray copy(NDArray a, NDManager manager, DataType type) {
        NDArray c = a.toType(type, true);
        c.attach(manager);
        return c;
    }
}
