package ai.djl.memopt.inference.server;

import io.javalin.config.JavalinConfig;
import java.time.Duration;
import org.eclipse.jetty.io.Connection;
import org.eclipse.jetty.server.ConnectionLimit;
import org.eclipse.jetty.server.HttpConnectionFactory;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.util.thread.QueuedThreadPool;

/**
 * The HTTP connector's bounds. Clients that stall or trickle must not starve the others (400 stalled uploads once
 * made {@code /health} time out for 30 s: each held one of Jetty's 250 threads, blocked reading its body):
 *
 * <ul>
 *   <li><b>Connections</b>: at most {@code maxConnections} are open; at the limit Jetty stops accepting and shortens
 *       the idle timeout of the open ones to {@value #AT_LIMIT_IDLE_MILLIS} ms, so idle and stalled clients make room.
 *   <li><b>Threads</b>: the pool has a thread for every connection plus {@value #SPARE_THREADS} for Jetty's acceptor,
 *       selector and reserve, so a connection that is allowed in is served, however many others block in a read.
 *   <li><b>Read timeout</b>: a connection on which no byte arrives for this long (headers, body, or between keep-alive
 *       requests) is closed; a body read answers 408. {@link RequestReader} also bounds a whole body's time.
 * </ul>
 *
 * A handler waiting for its generation reads nothing and is not subject to the read timeout.
 */
final class HttpConnections {

    static final int SPARE_THREADS = 24;
    static final long AT_LIMIT_IDLE_MILLIS = 1000;

    private final String host;
    private final int port;
    private final int maxConnections;
    private final Duration readTimeout;
    private ConnectionLimit limit;

    HttpConnections(String host, int port, int maxConnections, Duration readTimeout) {
        this.host = host;
        this.port = port;
        this.maxConnections = maxConnections;
        this.readTimeout = readTimeout;
    }

    /** Sets Javalin's thread pool and connector. */
    void configure(JavalinConfig cfg) {
        QueuedThreadPool pool = new QueuedThreadPool(maxConnections + SPARE_THREADS, Math.min(8, maxConnections + SPARE_THREADS));
        pool.setName("memopt-http");
        cfg.jetty.threadPool = pool;
        cfg.jetty.addConnector(
                (server, httpConfig) -> {
                    ServerConnector connector = new ServerConnector(server, 1, 1, new HttpConnectionFactory(httpConfig));
                    connector.setHost(host);
                    connector.setPort(port);
                    connector.setIdleTimeout(readTimeout.toMillis());
                    limit = new SheddingLimit(maxConnections, connector);
                    limit.setIdleTimeout(Math.min(AT_LIMIT_IDLE_MILLIS, readTimeout.toMillis()));
                    server.addBean(limit);
                    return connector;
                });
    }

    /**
     * Jetty's limit shortens the idle timeout of the connections open when the limit is reached; a connection accepted
     * just before (in a burst) opens a moment later with the long timeout and would hold its place. This one shortens
     * those too.
     */
    private static final class SheddingLimit extends ConnectionLimit {
        private volatile boolean limiting;

        SheddingLimit(int maxConnections, ServerConnector connector) {
            super(maxConnections, connector);
        }

        @Override
        protected void limit() {
            limiting = true;
            super.limit();
        }

        @Override
        protected void unlimit() {
            limiting = false;
            super.unlimit();
        }

        @Override
        public void onOpened(Connection connection) {
            super.onOpened(connection);
            if (limiting && getIdleTimeout() > 0) {
                connection.getEndPoint().setIdleTimeout(getIdleTimeout());
            }
        }
    }

    /** Connections open now (0 before the server starts). */
    int open() {
        ConnectionLimit l = limit;
        return l == null ? 0 : l.getConnections();
    }

    int max() {
        return maxConnections;
    }
}
