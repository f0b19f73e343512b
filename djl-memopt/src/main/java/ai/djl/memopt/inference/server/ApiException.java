package ai.djl.memopt.inference.server;

/**
 * An error answered to the client as {@code {"error": {"message", "type", "param", "code"}}} with an HTTP status, as
 * OpenAI's API answers them.
 */
final class ApiException extends RuntimeException {

    private static final long serialVersionUID = 1L;

    final int status;
    final String type;
    final String param;
    /** OpenAI's machine-readable code ({@code context_length_exceeded}), or null. */
    final String code;
    /** Seconds for a {@code Retry-After} header, or 0 for none. */
    final int retryAfterSeconds;

    ApiException(int status, String type, String param, String message) {
        this(status, type, param, null, message, 0);
    }

    private ApiException(int status, String type, String param, String code, String message, int retryAfterSeconds) {
        super(message);
        this.status = status;
        this.type = type;
        this.param = param;
        this.code = code;
        this.retryAfterSeconds = retryAfterSeconds;
    }

    static ApiException badRequest(String param, String message) {
        return new ApiException(400, "invalid_request_error", param, message);
    }

    /** 400 with OpenAI's {@code context_length_exceeded} code. */
    static ApiException contextLength(String param, String message) {
        return new ApiException(400, "invalid_request_error", param, "context_length_exceeded", message, 0);
    }

    /** 413: the body, or the memory the request needs, is more than this server takes at all. */
    static ApiException tooLarge(String param, String message) {
        return new ApiException(413, "invalid_request_error", param, "request_too_large", message, 0);
    }

    /** 408: the request did not arrive in time. */
    static ApiException timeout(String message) {
        return new ApiException(408, "invalid_request_error", null, "request_timeout", message, 0);
    }

    /** 429: try again later. */
    static ApiException busy(String message) {
        return new ApiException(429, "rate_limit_error", null, null, message, 1);
    }

    static ApiException shuttingDown() {
        return new ApiException(503, "server_error", null, "the server is shutting down");
    }
}
