package ai.djl.memopt.checkpoint;

/** Thrown when a checkpointed block's recomputation during backward does not reproduce its forward output. */
public final class NonDeterministicRecomputationException extends IllegalStateException {

    private static final long serialVersionUID = 1L;

    NonDeterministicRecomputationException(String message) {
        super(message);
    }
}
