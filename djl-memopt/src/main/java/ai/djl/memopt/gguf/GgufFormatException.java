package ai.djl.memopt.gguf;

import java.io.IOException;

/** A GGUF file that is malformed, truncated, of an unsupported version or type, or not what a model expects. */
public class GgufFormatException extends IOException {

    private static final long serialVersionUID = 1L;

    public GgufFormatException(String message) {
        super(message);
    }

    public GgufFormatException(String message, Throwable cause) {
        super(message, cause);
    }
}
