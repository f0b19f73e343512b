package ai.djl.memopt.inference;

/** Receives tokens as they are generated (streaming). Called on the generating thread; must not block for long. */
@FunctionalInterface
public interface TokenListener {

    /**
     * One new token of sequence {@code index}.
     *
     * @param index the sequence's index in the batch
     * @param tokenId the token
     * @param textDelta the text that became final with this token (may be empty: text that could still turn into a stop
     *     string, or an incomplete UTF-8 character, is held back); empty when there is no tokenizer
     */
    void onToken(int index, long tokenId, String textDelta);
}
