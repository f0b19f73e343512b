package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.ndarray.NDManager;

/**
 * A causal language model seen from the decoding loop: it opens {@link DecodingSession}s that take new tokens and
 * return the logits of the next one. Implementations: {@link RecomputingLanguageModel} (any block with the
 * {@code (input_ids, attention_mask) -> logits} contract, no cache), and the compressed-MLA-cache DeepSeek decoder.
 */
public interface LanguageModel {

    /** The device the model's weights live on; the generator creates its inputs there. */
    Device device();

    /** The vocabulary size (the last dimension of the logits). */
    int vocabSize();

    /**
     * Opens a session for {@code batchSize} sequences of at most {@code maxLength} tokens (prompt + new tokens). Its
     * buffers are allocated in (a sub-manager of) {@code manager} and freed by {@link DecodingSession#close()}.
     */
    DecodingSession newSession(NDManager manager, int batchSize, int maxLength);

    /**
     * The most tokens (prompt + new) one sequence may hold: the model's context ({@code max_position_embeddings} for
     * DeepSeek). {@link Generator} refuses longer requests before allocating anything. {@link Integer#MAX_VALUE} when
     * the model does not say.
     */
    default int maxLength() {
        return Integer.MAX_VALUE;
    }

    /** Bytes a session holds per token of {@code maxLength} (its cache buffers); 0 if unknown. */
    default long cacheBytesPerToken() {
        return 0;
    }

    /**
     * Cache bytes per token held on each device the model spans, in stage order ({@link StagePlan}): one entry, equal
     * to {@link #cacheBytesPerToken()}, for a model on one device.
     */
    default long[] cacheBytesPerTokenByStage() {
        return new long[] {cacheBytesPerToken()};
    }

    /** The stage whose device holds the logits (the last; 0 for a model on one device). */
    default int logitsStage() {
        return cacheBytesPerTokenByStage().length - 1;
    }

    /**
     * Bytes of the logits one decoding step of one sequence produces at {@code length} tokens: {@code vocabSize} FP32
     * values when only the last position is computed (the default).
     */
    default long stepLogitsBytes(int length) {
        return 4L * vocabSize();
    }
}
