package ai.djl.memopt.testing;

import ai.djl.engine.Engine;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.types.DataType;
import ai.djl.training.GradientCollector;
import java.util.function.Function;

/**
 * A function's output and the gradients of its inputs for one upstream gradient (a vector-Jacobian product), the
 * inputs copied first so that runs of several implementations start from the same arrays.
 */
public final class Vjp {

    private Vjp() {}

    /**
     * @return {@code [output (detached), d inputs[0], d inputs[1], ...]}
     */
    public static NDArray[] of(Function<NDList, NDArray> f, NDArray upstream, NDArray... inputs) {
        NDList copies = new NDList();
        for (NDArray input : inputs) {
            NDArray c = input.duplicate();
            c.setRequiresGradient(true);
            copies.add(c);
        }
        NDArray out;
        try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
            out = f.apply(copies);
            gc.backward(out.mul(upstream).toType(DataType.FLOAT32, false).sum());
        }
        NDArray[] result = new NDArray[inputs.length + 1];
        result[0] = out.stopGradient();
        for (int i = 0; i < inputs.length; i++) {
            result[i + 1] = copies.get(i).getGradient();
        }
        return result;
    }
}
