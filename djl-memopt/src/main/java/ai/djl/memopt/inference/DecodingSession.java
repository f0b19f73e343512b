package ai.djl.memopt.inference;

import ai.djl.ndarray.NDArray;

/**
 * One decoding pass over a batch: fed the prompt first, then one token per sequence per step. Keeps whatever cache
 * its model uses between calls. Not thread-safe.
 */
public interface DecodingSession extends AutoCloseable {

    /**
     * Appends tokens to every sequence and returns the logits after the last of them.
     *
     * @param inputIds (B, T) INT64, the new tokens (left-padded on the first call)
     * @param positionIds (B, T) INT64, each token's position in its own sequence (padding excluded)
     * @param attentionMask (B, past + T) INT64, 1 for real tokens, 0 for padding, over the whole sequence so far
     * @return (B, V) FP32 logits, in {@code inputIds}' manager (the caller's per-step scope)
     */
    NDArray next(NDArray inputIds, NDArray positionIds, NDArray attentionMask);

    /** The number of tokens fed so far (including padding). */
    int length();

    @Override
    void close();
}
