package ai.djl.memopt.model.deepseek;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Parameter;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;

/**
 * Token embedding table with a Hugging Face-named {@code weight (vocab, hidden)} parameter (DJL's own
 * {@code Embedding} names it differently). Row lookup by advanced indexing, whose gradient accumulates into the rows.
 *
 * <p>Shapes: {@code input_ids (B, T)} INT64 -> {@code (B, T, hidden)} in the weight's type.
 */
public final class TokenEmbedding extends AbstractBlock {

    private static final byte VERSION = 1;

    private final int vocabSize;
    private final int hiddenSize;
    private final Parameter weight;

    public TokenEmbedding(int vocabSize, int hiddenSize) {
        super(VERSION);
        this.vocabSize = vocabSize;
        this.hiddenSize = hiddenSize;
        weight = addParameter(Parameter.builder().setName("weight").setType(Parameter.Type.WEIGHT)
                .optShape(new Shape(vocabSize, hiddenSize)).build());
    }

    public Parameter weight() {
        return weight;
    }

    public int vocabSize() {
        return vocabSize;
    }

    public int hiddenSize() {
        return hiddenSize;
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        NDArray ids = inputs.head();
        NDArray table = ps.getValue(weight, ids.getDevice(), training);
        NDArray idx = ids.getDataType() == DataType.INT64 ? ids : ids.toType(DataType.INT64, false);
        try {
            return new NDList(table.get(new NDIndex("{}", idx))); // (B, T, H)
        } finally {
            if (idx != ids) {
                idx.close();
            }
        }
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0].add(hiddenSize)};
    }
}
