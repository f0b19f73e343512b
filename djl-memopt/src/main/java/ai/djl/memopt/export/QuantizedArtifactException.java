package ai.djl.memopt.export;

import java.io.IOException;

/** A quantized artifact is missing, truncated, corrupt or does not match the block it is loaded into. */
public class QuantizedArtifactException extends IOException {

    private static final long serialVersionUID = 1L;

    /** An error with a message naming the artifact, file, tensor or field. */
    public QuantizedArtifactException(String message) {
        super(message);
    }

    /** An error with a cause. */
    public QuantizedArtifactException(String message, Throwable cause) {
        super(message, cause);
    }
}
