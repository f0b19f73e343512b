package ai.djl.memopt.inference.server;

import io.javalin.http.Context;
import java.io.IOException;
import java.nio.ByteBuffer;
import org.eclipse.jetty.io.EndPoint;
import org.eclipse.jetty.server.Request;
import org.eclipse.jetty.util.BufferUtil;

/**
 * Whether the client of a request whose body has been read is still there. A blocking handler that writes nothing
 * (a non-streaming request waiting for its generation) would otherwise learn only when writing the answer. Like nginx
 * (which peeks with {@code recv(MSG_PEEK)}), it reads the socket without blocking: end of stream or a reset means the
 * client is gone. A client may not send more after a POST before its answer (RFC 9112 section 9.3.2: no pipelining
 * after a non-idempotent method), so a byte that does arrive is dropped and the connection is closed after the answer.
 */
final class ClientConnection {

    private final Context ctx;
    private final EndPoint endPoint;
    private final ByteBuffer scratch = BufferUtil.allocate(256);

    ClientConnection(Context ctx) {
        this.ctx = ctx;
        Request base = Request.getBaseRequest(ctx.req());
        this.endPoint = base == null ? null : base.getHttpChannel().getEndPoint();
    }

    /** True once the client has closed or reset its connection. */
    boolean gone() {
        if (endPoint == null) {
            return false;
        }
        if (!endPoint.isOpen() || endPoint.isInputShutdown()) {
            return true;
        }
        try {
            BufferUtil.clear(scratch);
            int n = endPoint.fill(scratch);
            if (n > 0) {
                ctx.header("Connection", "close"); // bytes after a POST: a client breaking the protocol
            }
            return n < 0;
        } catch (IOException e) {
            return true; // reset
        }
    }
}
