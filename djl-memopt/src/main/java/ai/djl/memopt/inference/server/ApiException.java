package ai.djl.memopt.inference.server;

/** An error answered to the client as {@code {"error": {"message", "type", "param", "code"}}} with an HTTP status. */
final class ApiException extends RuntimeException {

    private static final long serialVersionUID = 1L;

    final int status;
    final String type;
    final String param;
    /** Seconds for a {@code Retry-After} header, or 0 for none. */
    final int retryAfterSeconds;

    ApiException(int status, String type, String param, String message) {
        this(status, type, param, message, 0);
    }

    private ApiException(int status, String type, String param, String message, int retryAfterSeconds) {
        super(message);
        this.status = status;
        this.type = type;
        this.param = param;
        this.retryAfterSeconds = retryAfterSeconds;
    }

    static ApiException badRequest(String param, String message) {
        return new ApiException(400, "invalid_request_error", param, message);
    }

    /** 429: try again later. */
    static ApiException busy(String message) {
        return new ApiException(429, "rate_limit_error", null, message, 1);
    }

    static ApiException shuttingDown() {
        return new ApiException(503, "server_error", null, "the server is shutting down");
    }
}
