package ai.djl.memopt.nn;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import java.util.List;

/**
 * The stacked-weight view of a projection {@code y = x W^T}: what a mixture-of-experts layer needs to stack the same
 * projection of all its experts ({@code (E, ...)} per array) and run the experts chosen for each token at once, with
 * the expert ids as a device index. {@link LinearWeightSource} is the single-projection counterpart.
 *
 * <p>A projection hands out the arrays that hold its weight ({@link #weightArrays()}: a plain {@link Linear}'s weight;
 * a quantized layer's codes, scales and zero points; an adapter's base arrays and its own), the stacker stacks each
 * array over the experts, gathers the rows of the chosen experts, and gives them back to {@link #project}, which
 * computes what the projection computes, for {@code c} experts at once. The model knows only this interface, so a new
 * weight format never touches it.
 *
 * <pre>{@code
 * StackableProjection p = StackableProjection.of(expert.gateProj());       // null: cannot be stacked
 * NDArray stack = NDArrays.stack(arraysOfAllExperts);                        // (E, ...) per weight array
 * NDArray y = p.project(List.of(rowsOf(stack, ids)), x, DataType.FLOAT32);   // x (c, 1, in) -> (c, 1, out)
 * }</pre>
 */
public interface StackableProjection {

    /**
     * The arrays that hold the weight, in a fixed order: the very objects the block computes with (a stacker may turn
     * them into views of its stacks in place), each with the same shape for every projection of the same kind.
     */
    List<NDArray> weightArrays();

    /**
     * Null if {@code other}, a projection of the same class, can share stacks with this one (same scheme, shapes, types
     * and device), else why not, naming the difference.
     */
    String stackMismatch(StackableProjection other);

    /**
     * {@code x (c, 1, in)} through {@code c} projections of this kind, given the rows {@code (c, ...)} of each
     * {@link #weightArrays() weight array}'s stack, in order: {@code (c, 1, out)}. Inference only (no gradients
     * reach the stacks); temporaries are left to the caller's scope.
     *
     * @param type the computation type (the input's)
     */
    NDArray project(List<NDArray> rows, NDArray x, DataType type);

    /** Output features. */
    long outFeatures();

    /** Input features. */
    long inFeatures();

    /** The device of the weight arrays. */
    default Device device() {
        return weightArrays().get(0).getDevice();
    }

    /**
     * The stacked-weight view of {@code block}: itself if it implements this interface, a view of a plain
     * {@link Linear}'s weight, else null (the block cannot be stacked).
     */
    static StackableProjection of(Block block) {
        if (block instanceof StackableProjection) {
            return (StackableProjection) block;
        }
        if (block != null && block.getClass() == Linear.class) {
            return new LinearRows((Linear) block);
        }
        return null;
    }

    /**
     * Null if {@code b} can share stacks with {@code first} (expert 0's block), else why not: a different class, a
     * block that cannot be stacked, or the difference {@link #stackMismatch} names.
     */
    static String mismatch(Block first, Block b) {
        if (b.getClass() != first.getClass()) {
            return "a " + b.getClass().getSimpleName() + " among " + first.getClass().getSimpleName() + " experts";
        }
        StackableProjection view = of(b);
        if (view == null) {
            return "a " + b.getClass().getName() + " (only plain Linear blocks and StackableProjections such as"
                    + " int8/int4 QuantizedLinear and LoRA over those are gathered)";
        }
        return of(first).stackMismatch(view);
    }

    /** {@code x (c, 1, in) W^T} for gathered weights {@code w (c, out, in)}: {@code (c, 1, out)}. */
    static NDArray times(NDArray w, NDArray x) {
        Shape s = w.getShape();
        // W x^T rather than x W^T: the gathered weight is used as laid out, only the small x is transposed
        return w.matMul(x.transpose(0, 2, 1)).reshape(s.get(0), 1, s.get(1)); // (c, out, 1) -> (c, 1, out)
    }

    /** A plain {@link Linear} without bias: one weight array {@code (out, in)}, computed in the weight's type. */
    final class LinearRows implements StackableProjection {
        private final Linear linear;

        LinearRows(Linear linear) {
            this.linear = linear;
        }

        private Parameter weight() {
            return linear.getParameters().get("weight");
        }

        @Override
        public List<NDArray> weightArrays() {
            // a Linear's weight Parameter is fixed, but its array can be swapped (precision) or interned
            return List.of(weight().getArray());
        }

        @Override
        public String stackMismatch(StackableProjection other) {
            Linear b = ((LinearRows) other).linear;
            if (b.getParameters().size() != 1 || b.getParameters().get("weight") == null) {
                return "a Linear with a bias";
            }
            NDArray w = ((LinearRows) other).weight().getArray();
            NDArray w0 = weight().getArray();
            if (!w.getShape().equals(w0.getShape()) || w.getDataType() != w0.getDataType()
                    || !w.getDevice().equals(w0.getDevice())) {
                return "weight " + w.getShape() + " " + w.getDataType() + " differs from expert 0's";
            }
            return null;
        }

        @Override
        public NDArray project(List<NDArray> rows, NDArray x, DataType type) {
            return times(rows.get(0), x); // a Linear runs in its weight's type
        }

        @Override
        public long outFeatures() {
            return weight().getArray().getShape().get(0);
        }

        @Override
        public long inFeatures() {
            return weight().getArray().getShape().get(1);
        }
    }
}
