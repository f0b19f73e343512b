package ai.djl.memopt.inference;

import ai.djl.memopt.nn.HostReads;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;

/**
 * Picks the next token from logits on the logits' device: temperature, top-k and top-p (nucleus) filtering and
 * inverse-CDF sampling are NDArray ops; only the chosen ids, {@code B} longs, are read back to the host.
 *
 * <p>Sampling draws one uniform number per sequence from the caller's random stream (host side, so a seed makes runs
 * reproducible independent of the engine's global RNG and of other requests): the token is the first, in order of
 * decreasing probability, at which the cumulative kept probability exceeds {@code u * total}.
 *
 * <pre>{@code
 * long[] next = LogitsSampler.sample(logits, params, uniforms); // logits (B, V) FP32, uniforms B values in [0, 1)
 * }</pre>
 */
public final class LogitsSampler {

    private LogitsSampler() {}

    /**
     * Chooses one token per row.
     *
     * @param logits (B, V) floating point
     * @param params temperature / topK / topP
     * @param uniforms B numbers in [0, 1), ignored for greedy decoding
     * @return B token ids
     */
    public static long[] sample(NDArray logits, SamplingParams params, double[] uniforms) {
        Preconditions.checkArgument(logits.getShape().dimension() == 2, "logits must be (B, V), got %s", logits.getShape());
        NDManager scope = logits.getManager().newSubManager();
        try (scope) {
            NDArray x;
            if (logits.getDataType() == DataType.FLOAT32) {
                x = logits;
                x.tempAttach(scope); // results of ops on x now land in scope; x goes back to its manager after
            } else {
                x = logits.toType(DataType.FLOAT32, false);
                x.attach(scope);
            }
            if (params.isGreedy()) {
                NDArray ids = x.argMax(1); // (B)
                ids.attach(scope);
                return HostReads.longs(ids); // the step's one host read
            }
            int b = (int) x.getShape().get(0);
            Preconditions.checkArgument(uniforms.length == b, "need %s uniforms, got %s", b, uniforms.length);
            NDArray[] sorted = sortedKeptProbabilities(x, params, scope);
            NDArray probs = sorted[0]; // (B, V) by decreasing logit, zeros where filtered out
            NDArray order = sorted[1]; // (B, V) vocabulary id at each sorted position
            NDArray cum = probs.cumSum(1); // (B, V)
            NDArray total = cum.get(new NDIndex(":, -1:")); // (B, 1)
            float[] u = new float[b];
            for (int i = 0; i < b; i++) {
                u[i] = (float) uniforms[i];
            }
            NDArray threshold = scope.create(u, new Shape(b, 1)).toDevice(x.getDevice(), false).mul(total); // (B, 1)
            long vocab = x.getShape().get(1);
            NDArray position = cum.lte(threshold).sum(new int[] {1}, true).toType(DataType.INT64, false); // (B, 1)
            position = position.minimum(vocab - 1);
            NDArray ids = order.gather(position, 1); // (B, 1)
            return HostReads.longs(ids); // the step's one host read
        }
    }

    /**
     * The distribution {@link #sample} draws from, in vocabulary order: (B, V), zero outside the kept set, rows sum to 1.
     * Mainly for tests and diagnostics.
     */
    public static NDArray probabilities(NDArray logits, SamplingParams params) {
        NDManager out = logits.getManager();
        try (NDManager scope = out.newSubManager()) {
            NDArray x = logits.toType(DataType.FLOAT32, true);
            x.attach(scope);
            if (params.isGreedy()) {
                NDArray oneHot = x.argMax(1).oneHot((int) x.getShape().get(1)).toType(DataType.FLOAT32, false);
                oneHot.attach(out);
                return oneHot;
            }
            NDArray[] sorted = sortedKeptProbabilities(x, params, scope);
            NDArray probs = sorted[0].div(sorted[0].sum(new int[] {1}, true));
            NDArray inverse = sorted[1].argSort(1); // sorted position of each vocabulary id
            NDArray result = probs.gather(inverse, 1);
            result.attach(out);
            return result;
        }
    }

    /** (probabilities sorted by decreasing logit with the filtered tail zeroed, vocabulary ids in that order). */
    private static NDArray[] sortedKeptProbabilities(NDArray x, SamplingParams params, NDManager scope) {
        long vocab = x.getShape().get(1);
        NDArray order = x.argSort(1, false); // (B, V) decreasing
        order.attach(scope);
        NDArray sortedLogits = x.gather(order, 1).div(params.temperature()); // (B, V)
        sortedLogits.attach(scope);
        if (params.topK() > 0 && params.topK() < vocab) {
            NDArray rank = scope.arange(0, (int) vocab, 1, DataType.INT64, x.getDevice()).reshape(1, vocab); // (1, V)
            // DJL's where does not broadcast
            NDArray drop = rank.gte(params.topK()).broadcast(x.getShape()); // (B, V) boolean
            NDArray minusInf = scope.full(x.getShape(), Float.NEGATIVE_INFINITY, DataType.FLOAT32, x.getDevice());
            sortedLogits = NDArrays.where(drop, minusInf, sortedLogits); // (B, V)
        }
        NDArray probs = sortedLogits.softmax(1); // (B, V) FP32
        if (params.topP() < 1f) {
            NDArray before = probs.cumSum(1).sub(probs); // probability of the strictly more likely tokens
            // keep a token while the tokens before it have not yet reached topP (the first token is always kept)
            NDArray keep = before.lt(params.topP()).toType(DataType.FLOAT32, false);
            probs = probs.mul(keep);
        }
        return new NDArray[] {probs, order};
    }
}
