package ai.djl.memopt.inference;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;

/**
 * A tiny causal LM for tests with the (input_ids, attention_mask) -> logits (B, T, V) contract. The most likely token
 * after position t is {@code (3 * id_t + 7 * sum of the real ids up to t + position_t) mod V}, where padding (mask 0)
 * neither counts in the sum nor advances the position; the logits fall off as {@code -0.5 * |v - target|}, so sampling
 * has a real distribution. Because the next token depends on every earlier real token, their positions and the mask,
 * a generator that mishandles padding, positions or history gives different tokens.
 */
final class FakeCausalLm extends AbstractBlock {

    final int vocab;

    FakeCausalLm(int vocab) {
        super((byte) 1);
        this.vocab = vocab;
    }

    /** The rule above in plain Java: the greedy continuation of a prompt. */
    static long[] greedyReference(long[] prompt, int newTokens, int vocab) {
        long sum = 0;
        long[] seq = new long[prompt.length + newTokens];
        System.arraycopy(prompt, 0, seq, 0, prompt.length);
        for (int t = 0; t < prompt.length + newTokens - 1; t++) {
            sum += seq[t];
            if (t + 1 >= prompt.length) {
                seq[t + 1] = Math.floorMod(3 * seq[t] + 7 * sum + t, vocab);
            }
        }
        long[] out = new long[newTokens];
        System.arraycopy(seq, prompt.length, out, 0, newTokens);
        return out;
    }

    @Override
    protected NDList forwardInternal(ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        NDArray ids = inputs.get(0); // (B, T)
        NDArray mask = inputs.size() > 1 ? inputs.get(1).toType(DataType.INT64, false) : ids.onesLike(); // (B, T)
        NDArray sum = ids.mul(mask).cumSum(1); // (B, T)
        NDArray pos = mask.cumSum(1).sub(1); // (B, T)
        NDArray target = ids.mul(3).add(sum.mul(7)).add(pos).mod(vocab).expandDims(2); // (B, T, 1)
        NDArray v = ids.getManager().arange(0, vocab, 1, DataType.INT64).reshape(1, 1, vocab); // (1, 1, V)
        NDArray logits = v.sub(target).abs().toType(DataType.FLOAT32, false).mul(-0.5f); // (B, T, V)
        return new NDList(logits);
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        Shape s = inputShapes[0];
        return new Shape[] {new Shape(s.get(0), s.get(1), vocab)};
    }
}
