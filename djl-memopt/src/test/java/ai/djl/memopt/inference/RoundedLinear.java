package ai.djl.memopt.inference;

import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.core.Linear;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;

/**
 * A stand-in for a quantized projection: computes with its weight rounded to multiples of 1/16, and hands out that
 * rounded weight through {@link LinearWeightSource}. A decoder reading the raw parameter instead would disagree.
 */
final class RoundedLinear extends AbstractBlock implements LinearWeightSource {

    private final Linear inner;

    RoundedLinear(Linear inner) {
        super((byte) 1);
        this.inner = addChildBlock("inner", inner);
    }

    @Override
    public NDArray weight(NDManager manager) {
        NDArray w = inner.getParameters().get("weight").getArray();
        try (NDManager tmp = manager.newSubManager()) {
            w.tempAttach(tmp);
            NDArray r = w.mul(16).round().div(16);
            r.attach(manager);
            return r;
        }
    }

    @Override
    protected NDList forwardInternal(ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        NDArray x = inputs.head();
        NDArray w = weight(x.getManager()); // (out, in)
        return new NDList(x.matMul(w.transpose())); // (.., out)
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return inner.getOutputShapes(inputShapes);
    }
}
