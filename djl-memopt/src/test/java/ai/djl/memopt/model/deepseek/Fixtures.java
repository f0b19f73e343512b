package ai.djl.memopt.model.deepseek;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.training.ParameterStore;
import java.nio.file.Path;

/** Shared helpers for the transformers fixtures under {@code src/test/resources/fixtures}. */
final class Fixtures {

    static final Path V3 = Path.of("src/test/resources/fixtures/tiny-deepseek-v3");
    static final Path V2 = Path.of("src/test/resources/fixtures/tiny-deepseek-v2");

    private Fixtures() {}

    static float maxAbsDiff(NDArray a, NDArray b) {
        try (NDArray d = a.toType(DataType.FLOAT32, false).sub(b.toType(DataType.FLOAT32, false)).abs();
                NDArray m = d.max()) {
            return m.getFloat();
        }
    }

    /** Recompute-everything greedy decoding: appends {@code newTokens} argmax tokens to {@code prompt (1, T)}. */
    static long[] greedy(DeepSeekForCausalLM lm, NDManager manager, long[] prompt, int newTokens) {
        ParameterStore ps = new ParameterStore(manager, false);
        long[] seq = prompt.clone();
        for (int i = 0; i < newTokens; i++) {
            try (NDManager step = manager.newSubManager()) {
                NDArray ids = step.create(seq).reshape(1, seq.length);
                NDArray logits = lm.forward(ps, new NDList(ids), false).head();
                NDArray last = logits.get(new NDIndex("0, -1, :"));
                long next = last.argMax().getLong();
                logits.close();
                long[] grown = new long[seq.length + 1];
                System.arraycopy(seq, 0, grown, 0, seq.length);
                grown[seq.length] = next;
                seq = grown;
            }
        }
        return seq;
    }
}
