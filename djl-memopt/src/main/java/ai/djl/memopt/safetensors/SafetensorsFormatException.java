package ai.djl.memopt.safetensors;

import java.io.IOException;

/** A safetensors file (or a checkpoint directory) that is malformed, truncated or does not match what was expected. */
public class SafetensorsFormatException extends IOException {

    private static final long serialVersionUID = 1L;

    public SafetensorsFormatException(String message) {
        super(message);
    }

    public SafetensorsFormatException(String message, Throwable cause) {
        super(message, cause);
    }
}
