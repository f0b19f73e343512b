package ai.djl.memopt.inference.server;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.inference.FakeLms;
import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.OneThread;
import ai.djl.memopt.inference.TextTokenizer;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.Socket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

/** Clients that stall, trickle or go away must not hold the server: its connections, threads and model. */
@ExtendWith(OneThread.class)
class ServerConnectionsTest {

    static TextTokenizer tok;
    static final HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();

    @BeforeAll
    static void load() throws IOException {
        tok = FakeLms.deepSeekTokenizer();
    }

    @AfterAll
    static void close() {
        tok.close();
    }

    static GenerationServer.Builder server() {
        return GenerationServer.builder().setGenerator(new Generator(FakeLms.bigVocab(), tok)).optTokenizer(tok).optPort(0);
    }

    static HttpResponse<String> health(GenerationServer s, Duration timeout) throws IOException, InterruptedException {
        return http.send(
                HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + s.port() + "/health")).timeout(timeout).build(),
                HttpResponse.BodyHandlers.ofString());
    }

    /** A socket that sent a request's headers and the first bytes of its body, then stopped. */
    static Socket stalledUpload(int port) throws IOException {
        Socket socket = new Socket("127.0.0.1", port);
        OutputStream out = socket.getOutputStream();
        out.write(("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + "Content-Length: 1000\r\n\r\n{\"prompt\": \"").getBytes(StandardCharsets.US_ASCII));
        out.flush();
        return socket;
    }

    /** The status line's code of the response on a raw socket (read until the line ends). */
    static int status(Socket socket) throws IOException {
        InputStream in = socket.getInputStream();
        StringBuilder line = new StringBuilder();
        int c;
        while ((c = in.read()) >= 0 && c != '\n') {
            line.append((char) c);
        }
        assertTrue(line.toString().startsWith("HTTP/1.1 "), "status line: " + line);
        return Integer.parseInt(line.substring(9, 12));
    }

    static void closeAll(List<Socket> sockets) throws IOException {
        for (Socket s : sockets) {
            s.close();
        }
    }

    @Test
    void stalledUploadsDoNotStarveHealth() throws Exception {
        // more stalled uploads than Jetty's default pool has threads (250): each holds a thread, blocked reading its body
        List<Socket> stalled = new ArrayList<>();
        try (GenerationServer s = server().optMaxConnections(400).optReadTimeout(Duration.ofSeconds(60)).build().start()) {
            try {
                for (int i = 0; i < 300; i++) {
                    stalled.add(stalledUpload(s.port()));
                }
                GenerationServerTest.waitFor(() -> s.stats().openConnections() >= 300);
                // the read timeout (60 s) is far off: a thread is free for /health because the pool has one per connection
                HttpResponse<String> r = health(s, Duration.ofSeconds(10));
                assertEquals(200, r.statusCode(), r.body());
                assertEquals(301, s.stats().openConnections());
            } finally {
                closeAll(stalled);
            }
        }
    }

    @Test
    void theConnectionLimitHoldsAndIdleClientsMakeRoom() throws Exception {
        List<Socket> idle = new ArrayList<>();
        try (GenerationServer s = server().optMaxConnections(32).optReadTimeout(Duration.ofSeconds(60)).build().start()) {
            try {
                // connect, send nothing: 32 are taken in, the rest wait in the listen backlog (50 by default)
                for (int i = 0; i < 70; i++) {
                    idle.add(new Socket("127.0.0.1", s.port()));
                }
                GenerationServerTest.waitFor(() -> s.stats().openConnections() == 32);
                // at the limit, idle connections get a 1 s timeout instead of 60 s: /health is let in once they go
                CompletableFuture<HttpResponse<String>> h =
                        CompletableFuture.supplyAsync(() -> GenerationServerTest.unchecked(() -> health(s, Duration.ofSeconds(30))));
                int most = 0;
                while (!h.isDone()) {
                    most = Math.max(most, s.stats().openConnections());
                    Thread.sleep(5);
                }
                assertEquals(200, h.get().statusCode());
                assertTrue(most <= 32, "open connections went to " + most);
            } finally {
                closeAll(idle);
            }
        }
    }

    @Test
    void aBodyThatTricklesIsCutAtTheBodyTimeout() throws Exception {
        try (GenerationServer s = server().optBodyTimeout(Duration.ofMillis(500)).optReadTimeout(Duration.ofSeconds(10)).build().start();
                Socket socket = stalledUpload(s.port())) {
            OutputStream out = socket.getOutputStream();
            CompletableFuture<Integer> status = CompletableFuture.supplyAsync(() -> GenerationServerTest.unchecked(() -> status(socket)));
            int sent = 0;
            // one byte every 100 ms: well within the 10 s read timeout, but the 988 left would take 99 s
            while (!status.isDone() && sent < 988) {
                out.write('a');
                out.flush();
                sent++;
                Thread.sleep(100);
            }
            assertEquals(408, status.get(30, TimeUnit.SECONDS));
            assertTrue(sent < 988, "the whole body was sent");
        }
    }

    @Test
    void aBodyThatStopsGets408AfterTheReadTimeout() throws Exception {
        try (GenerationServer s = server().optReadTimeout(Duration.ofMillis(500)).build().start(); Socket socket = stalledUpload(s.port())) {
            socket.setSoTimeout(30_000);
            assertEquals(408, status(socket));
            GenerationServerTest.waitFor(() -> s.stats().openConnections() == 0);
        }
    }

    @Test
    void aWaitingRequestOutlivesTheReadTimeout() throws Exception {
        // the read timeout is for reading: a request waiting for its generation reads nothing and must not be cut
        GenerationServerTest.GatedLm gated = new GenerationServerTest.GatedLm(FakeLms.bigVocab());
        try (GenerationServer s = GenerationServer.builder().setGenerator(new Generator(gated, tok)).optPort(0)
                .optReadTimeout(Duration.ofMillis(300)).build().start()) {
            CompletableFuture<HttpResponse<String>> r = CompletableFuture.supplyAsync(() -> GenerationServerTest.unchecked(
                    () -> GenerationServerTest.post(s, "/v1/completions", "{\"prompt\":[5,6],\"max_tokens\":3,\"temperature\":0}")));
            GenerationServerTest.waitFor(() -> gated.permits.hasQueuedThreads());
            Thread.sleep(1500); // five read timeouts
            gated.permits.release(100);
            HttpResponse<String> done = r.get(30, TimeUnit.SECONDS);
            assertEquals(200, done.statusCode(), done.body());
            assertEquals(3, JsonParser.parseString(done.body()).getAsJsonObject().getAsJsonObject("usage").get("completion_tokens").getAsInt());
        } finally {
            gated.permits.release(10000);
        }
    }

    static Socket sendAndWait(int port, String body) throws IOException {
        Socket socket = new Socket("127.0.0.1", port);
        socket.getOutputStream().write(("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + "Content-Length: " + body.length() + "\r\n\r\n" + body).getBytes(StandardCharsets.US_ASCII));
        socket.getOutputStream().flush();
        return socket;
    }

    @Test
    void aNonStreamingClientThatGoesAwayCancelsItsGeneration() throws Exception {
        GenerationServerTest.GatedLm gated = new GenerationServerTest.GatedLm(FakeLms.bigVocab());
        try (GenerationServer s = GenerationServer.builder().setGenerator(new Generator(gated, tok)).optPort(0).optMaxQueue(2).build().start()) {
            String body = "{\"prompt\":[5,6],\"max_tokens\":60,\"temperature\":0}";
            Socket running = sendAndWait(s.port(), body);
            GenerationServerTest.waitFor(() -> s.pending() == 1 && gated.permits.hasQueuedThreads()); // its first step waits
            Socket queued = sendAndWait(s.port(), body);
            GenerationServerTest.waitFor(() -> s.pending() == 2);
            running.close();
            queued.close();
            // both are noticed while the model is still held at the first step: nothing has been released yet
            GenerationServerTest.waitFor(() -> s.stats().cancelledByDisconnect() == 2);
            gated.permits.release(10000);
            GenerationServerTest.waitFor(() -> s.pending() == 0);
            assertEquals(1, gated.steps.get(), "decode steps after the clients left"); // the one already waiting, no more
            assertEquals(0, s.stats().pendingBytes());
            assertEquals(200, GenerationServerTest.post(s, "/v1/completions", "{\"prompt\":[5],\"max_tokens\":2}").statusCode());
        } finally {
            gated.permits.release(10000);
        }
    }
}
