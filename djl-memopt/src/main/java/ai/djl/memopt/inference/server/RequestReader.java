package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.TextTokenizer;
import io.javalin.http.Context;
import java.io.IOException;
import java.io.InputStream;

/** Reads a request body within the size limit and validates it into an {@link OpenAiRequest}. */
final class RequestReader {

    private final long maxBodyBytes;
    private final TextTokenizer tokenizer;
    private final OpenAiRequest.Limits limits;

    RequestReader(long maxBodyBytes, TextTokenizer tokenizer, OpenAiRequest.Limits limits) {
        this.maxBodyBytes = maxBodyBytes;
        this.tokenizer = tokenizer;
        this.limits = limits;
    }

    /**
     * The validated request.
     *
     * @throws ApiException 413 for a body over the limit, 400 for malformed JSON or bad parameters
     */
    OpenAiRequest read(Context ctx, boolean chat) throws IOException {
        return OpenAiRequest.parse(body(ctx), chat, tokenizer, limits);
    }

    private byte[] body(Context ctx) throws IOException {
        long declared = ctx.req().getContentLengthLong();
        if (declared > maxBodyBytes) {
            throw tooLarge();
        }
        try (InputStream in = ctx.req().getInputStream()) {
            byte[] body = in.readNBytes((int) Math.min(Integer.MAX_VALUE - 8, maxBodyBytes + 1));
            if (body.length > maxBodyBytes) {
                throw tooLarge();
            }
            return body;
        }
    }

    private ApiException tooLarge() {
        return new ApiException(413, "invalid_request_error", null, "the request body exceeds " + maxBodyBytes + " bytes");
    }
}
