package ai.djl.memopt.inference;

/**
 * A request that does not fit the model's context: a prompt of more tokens than the context leaves, or prompt + new
 * tokens beyond it. Thrown before anything of the request's size is allocated (and, for a text prompt that is certainly
 * too long, before it is tokenized: see {@link TextTokenizer#encode(String, boolean, int)}).
 */
public final class ContextLengthException extends IllegalArgumentException {

    private static final long serialVersionUID = 1L;

    private final long tokens;
    private final int limit;

    /**
     * @param tokens the tokens the request needs (for an untokenized text, the fewest it can have)
     * @param limit the most it may have
     */
    public ContextLengthException(long tokens, int limit, String message) {
        super(message);
        this.tokens = tokens;
        this.limit = limit;
    }

    /** The tokens the request needs; for a text refused without tokenizing, a lower bound. */
    public long tokens() {
        return tokens;
    }

    /** The most tokens the request may have. */
    public int limit() {
        return limit;
    }
}
