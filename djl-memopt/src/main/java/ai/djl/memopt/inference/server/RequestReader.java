package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.TextTokenizer;
import io.javalin.http.Context;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.time.Duration;

/**
 * Reads a request body within the size limit and the body deadline, and validates it into an {@link OpenAiRequest}.
 * Each read blocks at most the connection's read (idle) timeout; a body that trickles in slower than that still has to
 * be complete within the body timeout, so one upload holds a server thread for a bounded time.
 */
final class RequestReader {

    private final long maxBodyBytes;
    private final long bodyTimeoutNanos;
    private final TextTokenizer tokenizer;
    private final OpenAiRequest.Limits limits;

    RequestReader(long maxBodyBytes, Duration bodyTimeout, TextTokenizer tokenizer, OpenAiRequest.Limits limits) {
        this.maxBodyBytes = maxBodyBytes;
        this.bodyTimeoutNanos = bodyTimeout.toNanos();
        this.tokenizer = tokenizer;
        this.limits = limits;
    }

    /**
     * The validated request (not yet tokenized).
     *
     * @throws ApiException 413 for a body over the limit, 408 for one that did not arrive in time, 400 for invalid
     *     UTF-8, malformed JSON or bad parameters
     */
    OpenAiRequest read(Context ctx, boolean chat) throws IOException {
        return OpenAiRequest.parse(body(ctx), chat, tokenizer, limits);
    }

    private byte[] body(Context ctx) throws IOException {
        long declared = ctx.req().getContentLengthLong();
        long deadline = System.nanoTime() + bodyTimeoutNanos;
        byte[] buf = new byte[1 << 16];
        if (declared > maxBodyBytes) {
            try (InputStream in = ctx.req().getInputStream()) {
                drain(in, buf, deadline);
            }
            throw tooLarge();
        }
        ByteArrayOutputStream body = new ByteArrayOutputStream((int) Math.max(0, Math.min(declared, 1 << 16)));
        try (InputStream in = ctx.req().getInputStream()) {
            while (true) {
                int n;
                try {
                    n = in.read(buf);
                } catch (IOException e) {
                    throw ApiException.timeout("the request body stopped arriving (" + e.getMessage() + ")");
                }
                if (n < 0) {
                    return body.toByteArray();
                }
                body.write(buf, 0, n);
                if (body.size() > maxBodyBytes) {
                    drain(in, buf, deadline);
                    throw tooLarge();
                }
                if (System.nanoTime() > deadline) {
                    throw ApiException.timeout("the request body did not arrive within "
                            + Duration.ofNanos(bodyTimeoutNanos).toSeconds() + " s (" + body.size() + " bytes came)");
                }
            }
        }
    }

    /**
     * Reads and drops what the client is still sending of a refused body, at most {@link #DRAIN_BYTES} and until the
     * body deadline: a connection closed with unread bytes is reset, and a reset can discard the 413 on its way to a
     * client still writing (seen as "header parser received no bytes" under load). Errors are ignored: the answer is
     * 413 either way.
     */
    private static void drain(InputStream in, byte[] buf, long deadline) {
        long left = DRAIN_BYTES;
        try {
            while (left > 0 && System.nanoTime() < deadline) {
                int n = in.read(buf, 0, (int) Math.min(buf.length, left));
                if (n < 0) {
                    return;
                }
                left -= n;
            }
        } catch (IOException e) {
            // the client went away or stalled: nothing more to read
        }
    }

    /** The most bytes of a refused body read and dropped before answering 413 (4 MiB). */
    static final long DRAIN_BYTES = 4L << 20;

    private ApiException tooLarge() {
        return ApiException.tooLarge(null, "the request body exceeds " + maxBodyBytes + " bytes");
    }
}
