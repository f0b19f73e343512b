package ai.djl.memopt.model.deepseek;

import ai.djl.memopt.nn.Scalars;
import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Parameter;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;

/**
 * Root-mean-square layer norm as in Hugging Face's {@code DeepseekV3RMSNorm}: {@code weight * (x / sqrt(mean(x^2) +
 * eps))}, the normalisation computed in FP32 and cast back to the input's type before the weight is applied.
 *
 * <p>Shapes: input {@code (..., dim)} -> output {@code (..., dim)}; parameter {@code weight (dim)}.
 *
 * <pre>{@code
 * RmsNorm norm = new RmsNorm(1024, 1e-6);
 * NDArray y = norm.forward(ps, new NDList(x), false).head();
 * }</pre>
 */
public final class RmsNorm extends AbstractBlock {

    private static final byte VERSION = 1;

    private final int dim;
    private final float eps;
    private final Parameter weight;

    /**
     * @param dim size of the normalised (last) axis
     * @param eps variance epsilon
     */
    public RmsNorm(int dim, double eps) {
        super(VERSION);
        Preconditions.checkArgument(dim > 0, "RmsNorm dim must be > 0, got %s", dim);
        Preconditions.checkArgument(eps > 0, "RmsNorm eps must be > 0, got %s", eps);
        this.dim = dim;
        this.eps = (float) eps;
        this.weight = addParameter(
                Parameter.builder().setName("weight").setType(Parameter.Type.GAMMA).optShape(new Shape(dim)).build());
    }

    public int dim() {
        return dim;
    }

    public float eps() {
        return eps;
    }

    /** The {@code weight} parameter. */
    public Parameter weight() {
        return weight;
    }

    /** Normalises {@code x (..., dim)} with the given weight array. */
    public NDArray apply(NDArray x, NDArray w) {
        return Scoped.run(() -> {
            DataType in = x.getDataType();
            NDArray x32 = TypeCasts.cast(x, DataType.FLOAT32);
            NDArray variance = x32.square().mean(new int[] {-1}, true); // (..., 1)
            NDArray normed = x32.div(Scalars.add(variance, eps).sqrt()); // (..., dim)
            return new NDList(w.mul(TypeCasts.cast(normed, in)));
        }).head();
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        NDArray x = inputs.head();
        return new NDList(apply(x, ps.getValue(weight, x.getDevice(), training)));
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0]};
    }
}
