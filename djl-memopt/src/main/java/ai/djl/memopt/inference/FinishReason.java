package ai.djl.memopt.inference;

/** Why a sequence stopped; {@link #wireName()} is the OpenAI API's {@code finish_reason}. */
public enum FinishReason {
    /** An EOS token or a stop string. */
    STOP("stop"),
    /** {@code maxNewTokens} reached. */
    LENGTH("length"),
    /** The caller cancelled (client gone, server shutting down). */
    CANCELLED("cancelled");

    private final String wireName;

    FinishReason(String wireName) {
        this.wireName = wireName;
    }

    public String wireName() {
        return wireName;
    }
}
