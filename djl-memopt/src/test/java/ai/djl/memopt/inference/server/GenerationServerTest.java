package ai.djl.memopt.inference.server;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.inference.DecodingSession;
import ai.djl.memopt.inference.FakeLms;
import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.LanguageModel;
import ai.djl.memopt.inference.OneThread;
import ai.djl.memopt.inference.TextTokenizer;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.net.ConnectException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.Semaphore;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

@ExtendWith(OneThread.class)
class GenerationServerTest {

    static TextTokenizer tok;
    static LanguageModel lm;
    static GenerationServer server;
    static final HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();

    @BeforeAll
    static void start() throws IOException {
        tok = FakeLms.deepSeekTokenizer();
        lm = FakeLms.bigVocab();
        server =
                GenerationServer.builder()
                        .setGenerator(new Generator(lm, tok))
                        .optTokenizer(tok)
                        .optModelName("fake")
                        .optPort(0)
                        .optMaxTokens(64)
                        .optMaxBodyBytes(4096)
                        .build()
                        .start();
    }

    @AfterAll
    static void stop() {
        server.close();
        tok.close();
    }

    static HttpResponse<String> post(GenerationServer s, String path, String body) throws IOException, InterruptedException {
        HttpRequest req =
                HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + s.port() + path))
                        .timeout(Duration.ofSeconds(30))
                        .header("Content-Type", "application/json")
                        .POST(HttpRequest.BodyPublishers.ofString(body))
                        .build();
        return http.send(req, HttpResponse.BodyHandlers.ofString());
    }

    static JsonObject json(HttpResponse<String> r) {
        return JsonParser.parseString(r.body()).getAsJsonObject();
    }

    /** The greedy continuation the fake model must give, as text. */
    static String expectedText(long[] prompt, int n) {
        return tok.decode(FakeLms.greedyReference(prompt, n), true);
    }

    @Test
    void health() throws Exception {
        HttpResponse<String> r =
                http.send(HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + server.port() + "/health")).build(), HttpResponse.BodyHandlers.ofString());
        assertEquals(200, r.statusCode());
        assertEquals("ok", json(r).get("status").getAsString());
    }

    @Test
    void completionFromTextAndFromIds() throws Exception {
        HttpResponse<String> r = post(server, "/v1/completions", "{\"model\":\"fake\",\"prompt\":\"Q\",\"max_tokens\":5,\"temperature\":0}");
        assertEquals(200, r.statusCode(), r.body());
        assertEquals("application/json", r.headers().firstValue("Content-Type").orElse("").split(";")[0]);
        JsonObject o = json(r);
        assertEquals("text_completion", o.get("object").getAsString());
        JsonObject choice = o.getAsJsonArray("choices").get(0).getAsJsonObject();
        assertEquals(expectedText(new long[] {0, 51}, 5), choice.get("text").getAsString());
        assertEquals("length", choice.get("finish_reason").getAsString());
        assertEquals(2, o.getAsJsonObject("usage").get("prompt_tokens").getAsInt());
        assertEquals(5, o.getAsJsonObject("usage").get("completion_tokens").getAsInt());

        r = post(server, "/v1/completions", "{\"prompt\":[17,3,40],\"max_tokens\":4,\"temperature\":0}");
        JsonArray ids = json(r).getAsJsonObject("usage").getAsJsonArray("completion_token_ids");
        long[] expected = FakeLms.greedyReference(new long[] {17, 3, 40}, 4);
        for (int i = 0; i < 4; i++) {
            assertEquals(expected[i], ids.get(i).getAsLong());
        }
    }

    @Test
    void chatCompletion() throws Exception {
        HttpResponse<String> r =
                post(server, "/v1/chat/completions", "{\"messages\":[{\"role\":\"user\",\"content\":\"Q\"}],\"max_tokens\":6,\"temperature\":0}");
        assertEquals(200, r.statusCode(), r.body());
        JsonObject o = json(r);
        assertEquals("chat.completion", o.get("object").getAsString());
        JsonObject message = o.getAsJsonArray("choices").get(0).getAsJsonObject().getAsJsonObject("message");
        assertEquals("assistant", message.get("role").getAsString());
        assertEquals(expectedText(new long[] {0, 128803, 51, 128804}, 6), message.get("content").getAsString());
        assertEquals(4, o.getAsJsonObject("usage").get("prompt_tokens").getAsInt());
    }

    static List<JsonObject> events(String body) {
        String[] blocks = body.split("\n\n");
        List<JsonObject> out = new ArrayList<>();
        for (int i = 0; i < blocks.length; i++) {
            assertTrue(blocks[i].startsWith("data: "), blocks[i]);
            String data = blocks[i].substring(6);
            if (i == blocks.length - 1) {
                assertEquals("[DONE]", data);
            } else {
                out.add(JsonParser.parseString(data).getAsJsonObject());
            }
        }
        return out;
    }

    @Test
    void streamingCompletionAndChat() throws Exception {
        HttpResponse<String> r = post(server, "/v1/completions", "{\"prompt\":\"Q\",\"max_tokens\":7,\"temperature\":0,\"stream\":true}");
        assertEquals(200, r.statusCode());
        assertTrue(r.headers().firstValue("Content-Type").orElse("").startsWith("text/event-stream"));
        List<JsonObject> ev = events(r.body());
        StringBuilder text = new StringBuilder();
        for (JsonObject e : ev) {
            text.append(e.getAsJsonArray("choices").get(0).getAsJsonObject().get("text").getAsString());
        }
        assertEquals(expectedText(new long[] {0, 51}, 7), text.toString());
        assertTrue(ev.size() >= 2, "several chunks");
        assertEquals("length", ev.get(ev.size() - 1).getAsJsonArray("choices").get(0).getAsJsonObject().get("finish_reason").getAsString());

        r = post(server, "/v1/chat/completions", "{\"messages\":[{\"role\":\"user\",\"content\":\"Q\"}],\"max_tokens\":6,\"temperature\":0,\"stream\":true}");
        ev = events(r.body());
        JsonObject first = ev.get(0).getAsJsonArray("choices").get(0).getAsJsonObject().getAsJsonObject("delta");
        assertEquals("assistant", first.get("role").getAsString());
        text.setLength(0);
        for (JsonObject e : ev) {
            assertEquals("chat.completion.chunk", e.get("object").getAsString());
            JsonElement c = e.getAsJsonArray("choices").get(0).getAsJsonObject().getAsJsonObject("delta").get("content");
            if (c != null) {
                text.append(c.getAsString());
            }
        }
        assertEquals(expectedText(new long[] {0, 128803, 51, 128804}, 6), text.toString());
    }

    @Test
    void stopStringCutsTheText() throws Exception {
        String full = expectedText(new long[] {0, 51}, 12);
        String stop = full.substring(4, 6);
        HttpResponse<String> r =
                post(server, "/v1/completions", "{\"prompt\":\"Q\",\"max_tokens\":12,\"temperature\":0,\"stop\":[" + JsonParser.parseString("\"x\"") + "," + new com.google.gson.Gson().toJson(stop) + "]}");
        JsonObject choice = json(r).getAsJsonArray("choices").get(0).getAsJsonObject();
        assertEquals(full.substring(0, full.indexOf(stop)), choice.get("text").getAsString());
        assertEquals("stop", choice.get("finish_reason").getAsString());
    }

    @Test
    void seededSamplingIsReproducible() throws Exception {
        String body = "{\"prompt\":\"Q\",\"max_tokens\":10,\"temperature\":1.5,\"top_k\":50,\"seed\":123}";
        String a = json(post(server, "/v1/completions", body)).getAsJsonObject("usage").get("completion_token_ids").toString();
        String b = json(post(server, "/v1/completions", body)).getAsJsonObject("usage").get("completion_token_ids").toString();
        assertEquals(a, b);
    }

    @Test
    void concurrentClientsEachGetTheirOwnAnswer() throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(6);
        try {
            List<Future<HttpResponse<String>>> futures = new ArrayList<>();
            for (int i = 0; i < 6; i++) {
                long a = 10 + i;
                String body = "{\"prompt\":[" + a + ",7],\"max_tokens\":" + (3 + i) + ",\"temperature\":0" + (i % 2 == 0 ? ",\"stream\":true" : "") + "}";
                futures.add(pool.submit(() -> post(server, "/v1/completions", body)));
            }
            for (int i = 0; i < 6; i++) {
                HttpResponse<String> r = futures.get(i).get(60, TimeUnit.SECONDS);
                assertEquals(200, r.statusCode(), r.body());
                String expected = expectedText(new long[] {10 + i, 7}, 3 + i);
                String text;
                if (i % 2 == 0) {
                    StringBuilder sb = new StringBuilder();
                    for (JsonObject e : events(r.body())) {
                        sb.append(e.getAsJsonArray("choices").get(0).getAsJsonObject().get("text").getAsString());
                    }
                    text = sb.toString();
                } else {
                    text = json(r).getAsJsonArray("choices").get(0).getAsJsonObject().get("text").getAsString();
                }
                assertEquals(expected, text, "client " + i);
            }
        } finally {
            pool.shutdownNow();
        }
    }

    void assertError(HttpResponse<String> r, int status, String param) {
        assertEquals(status, r.statusCode(), r.body());
        assertTrue(r.headers().firstValue("Content-Type").orElse("").startsWith("application/json"));
        JsonObject err = json(r).getAsJsonObject("error");
        assertTrue(err.get("message").getAsString().length() > 3);
        assertTrue(err.has("type"));
        if (param != null) {
            assertEquals(param, err.get("param").getAsString(), r.body());
        }
    }

    @Test
    void badRequestsAnswer400WithAJsonError() throws Exception {
        assertError(post(server, "/v1/completions", "{\"prompt\": \"Q\", "), 400, null);
        assertError(post(server, "/v1/completions", "[1, 2]"), 400, null);
        assertError(post(server, "/v1/completions", "{}"), 400, "prompt");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"temperature\":\"hot\"}"), 400, "temperature");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"temperature\":3}"), 400, "temperature");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"max_tokens\":0}"), 400, "max_tokens");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"max_tokens\":65}"), 400, "max_tokens");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"max_tokens\":2.5}"), 400, "max_tokens");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"top_p\":0}"), 400, "top_p");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"top_k\":-2}"), 400, "top_k");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"n\":2}"), 400, "n");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"logprobs\":3}"), 400, "logprobs");
        assertEquals(200, post(server, "/v1/completions", "{\"prompt\":\"Q\",\"max_tokens\":1,\"logprobs\":null}").statusCode());
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}"), 400, "stop");
        assertError(post(server, "/v1/completions", "{\"prompt\":\"Q\",\"stream\":\"yes\"}"), 400, "stream");
        assertError(post(server, "/v1/completions", "{\"prompt\":[1, 999999999]}"), 400, "prompt");
        assertError(post(server, "/v1/completions", "{\"prompt\":[]}"), 400, "prompt");
        assertError(post(server, "/v1/chat/completions", "{\"messages\":[]}"), 400, "messages");
        assertError(post(server, "/v1/chat/completions", "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}"), 400, "messages");
        assertError(post(server, "/v1/chat/completions", "{\"messages\":[{\"role\":\"user\"}]}"), 400, "messages");
        assertError(post(server, "/v1/nothing", "{}"), 404, null);
    }

    static HttpResponse<String> send(String method, String path, String body) throws IOException, InterruptedException {
        HttpRequest req =
                HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + server.port() + path))
                        .timeout(Duration.ofSeconds(30))
                        .method(method, body == null ? HttpRequest.BodyPublishers.noBody() : HttpRequest.BodyPublishers.ofString(body))
                        .build();
        return http.send(req, HttpResponse.BodyHandlers.ofString());
    }

    @Test
    void wrongMethodAnswers405WithAnAllowHeader() throws Exception {
        HttpResponse<String> r = send("GET", "/v1/completions", null);
        assertError(r, 405, null);
        assertEquals("POST", r.headers().firstValue("Allow").orElse(null), r.headers().map().toString());
        r = send("PUT", "/v1/chat/completions", "{}");
        assertError(r, 405, null);
        assertEquals("POST", r.headers().firstValue("Allow").orElse(null));
        r = send("POST", "/health", "{}");
        assertError(r, 405, null);
        assertEquals("GET", r.headers().firstValue("Allow").orElse(null));
        r = send("DELETE", "/v1/models", null);
        assertError(r, 405, null);
        assertEquals("GET", r.headers().firstValue("Allow").orElse(null));
        assertError(send("GET", "/v1/nothing", null), 404, null); // an unknown path is still 404
    }

    @Test
    void invalidUtf8IsRefusedNamingTheByteOffset() throws Exception {
        byte[] head = "{\"prompt\":\"caf\u00e9 ".getBytes(java.nio.charset.StandardCharsets.UTF_8);
        byte[] tail = " au lait\",\"max_tokens\":2}".getBytes(java.nio.charset.StandardCharsets.UTF_8);
        for (byte[] bad : new byte[][] {{(byte) 0xff}, {(byte) 0xc3}, {(byte) 0xed, (byte) 0xa0, (byte) 0x80}}) {
            byte[] body = new byte[head.length + bad.length + tail.length];
            System.arraycopy(head, 0, body, 0, head.length);
            System.arraycopy(bad, 0, body, head.length, bad.length);
            System.arraycopy(tail, 0, body, head.length + bad.length, tail.length);
            HttpRequest req =
                    HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + server.port() + "/v1/completions"))
                            .POST(HttpRequest.BodyPublishers.ofByteArray(body))
                            .build();
            HttpResponse<String> r = http.send(req, HttpResponse.BodyHandlers.ofString());
            assertError(r, 400, null);
            String message = json(r).getAsJsonObject("error").get("message").getAsString();
            assertTrue(message.contains("UTF-8") && message.contains("byte offset " + head.length), message);
        }
        // a lone surrogate written as a JSON escape is not text either
        assertError(post(server, "/v1/completions", "{\"prompt\":\"ab\\ud800cd\",\"max_tokens\":2}"), 400, "prompt");
        assertError(post(server, "/v1/chat/completions",
                "{\"messages\":[{\"role\":\"user\",\"content\":\"x\\udc00\"}],\"max_tokens\":2}"), 400, "messages");
        // well-formed text outside the BMP is fine
        assertEquals(200, post(server, "/v1/completions", "{\"prompt\":\"\\ud83d\\ude00 ok\",\"max_tokens\":2}").statusCode());
    }

    @Test
    void oversizedBodyAnswers413() throws Exception {
        String big = "{\"prompt\":\"" + "a".repeat(5000) + "\"}";
        assertError(post(server, "/v1/completions", big), 413, null);
    }

    /** A model whose steps wait for permits, to hold the worker busy. */
    static final class GatedLm implements LanguageModel {
        final LanguageModel inner;
        final Semaphore permits = new Semaphore(0);
        final java.util.concurrent.atomic.AtomicInteger steps = new java.util.concurrent.atomic.AtomicInteger();

        GatedLm(LanguageModel inner) {
            this.inner = inner;
        }

        @Override
        public Device device() {
            return inner.device();
        }

        @Override
        public int vocabSize() {
            return inner.vocabSize();
        }

        @Override
        public int maxLength() {
            return inner.maxLength();
        }

        @Override
        public long cacheBytesPerToken() {
            return inner.cacheBytesPerToken();
        }

        @Override
        public long stepLogitsBytes(int length) {
            return inner.stepLogitsBytes(length);
        }

        @Override
        public DecodingSession newSession(NDManager manager, int batchSize, int maxLength) {
            DecodingSession s = inner.newSession(manager, batchSize, maxLength);
            return new DecodingSession() {
                @Override
                public NDArray next(NDArray inputIds, NDArray positionIds, NDArray attentionMask) {
                    permits.acquireUninterruptibly();
                    steps.incrementAndGet();
                    return s.next(inputIds, positionIds, attentionMask);
                }

                @Override
                public int length() {
                    return s.length();
                }

                @Override
                public void close() {
                    s.close();
                }
            };
        }
    }

    @Test
    void fullQueueAnswers429AtOnceAndShutdownIsGraceful() throws Exception {
        GatedLm gated = new GatedLm(lm);
        GenerationServer s =
                GenerationServer.builder()
                        .setGenerator(new Generator(gated, tok))
                        .optTokenizer(tok)
                        .optPort(0)
                        .optMaxQueue(1)
                        .optShutdownGrace(Duration.ofMillis(200))
                        .build()
                        .start();
        int port = s.port();
        try {
            String body = "{\"prompt\":[5,6],\"max_tokens\":20,\"temperature\":0}";
            CompletableFuture<HttpResponse<String>> running = CompletableFuture.supplyAsync(() -> unchecked(() -> post(s, "/v1/completions", body)));
            waitFor(() -> s.pending() == 1 && gated.permits.hasQueuedThreads());
            CompletableFuture<HttpResponse<String>> queued = CompletableFuture.supplyAsync(() -> unchecked(() -> post(s, "/v1/completions", body)));
            waitFor(() -> s.pending() == 2);
            long t0 = System.nanoTime();
            HttpResponse<String> rejected = post(s, "/v1/completions", body);
            assertError(rejected, 429, null);
            assertTrue(System.nanoTime() - t0 < TimeUnit.SECONDS.toNanos(5), "429 must not wait");

            gated.permits.release(3); // the running request makes 3 tokens, then shutdown cancels it
            waitFor(() -> gated.steps.get() == 3 && gated.permits.hasQueuedThreads()); // on a loaded machine, not before
            CompletableFuture<Void> closing = CompletableFuture.runAsync(s::close);
            waitFor(() -> unchecked(() -> post(s, "/v1/completions", body)).statusCode() == 503);
            Thread.sleep(1000); // past the 200 ms grace: the cancel flags are set while the worker still waits
            gated.permits.release(1000);
            closing.get(30, TimeUnit.SECONDS);

            HttpResponse<String> first = running.get(30, TimeUnit.SECONDS);
            assertEquals(200, first.statusCode(), first.body());
            JsonObject choice = json(first).getAsJsonArray("choices").get(0).getAsJsonObject();
            assertEquals("cancelled", choice.get("finish_reason").getAsString());
            int made = json(first).getAsJsonObject("usage").get("completion_tokens").getAsInt();
            assertTrue(made >= 3 && made < 20, "tokens before the cancel: " + made);
            assertError(queued.get(30, TimeUnit.SECONDS), 503, null);
            assertThrows(ConnectException.class, () -> http.send(
                    HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + port + "/health")).build(), HttpResponse.BodyHandlers.ofString()));
        } finally {
            gated.permits.release(10000);
            s.close();
        }
    }

    @Test
    void aStreamingClientThatGoesAwayCancelsItsGeneration() throws Exception {
        GatedLm gated = new GatedLm(lm);
        try (GenerationServer s = GenerationServer.builder().setGenerator(new Generator(gated, tok)).optTokenizer(tok).optPort(0).build().start()) {
            HttpRequest req =
                    HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + s.port() + "/v1/chat/completions"))
                            .POST(HttpRequest.BodyPublishers.ofString(
                                    "{\"messages\":[{\"role\":\"user\",\"content\":\"Q\"}],\"max_tokens\":60,\"temperature\":0,\"stream\":true}"))
                            .build();
            HttpResponse<java.io.InputStream> r = http.send(req, HttpResponse.BodyHandlers.ofInputStream());
            java.io.InputStream body = r.body();
            byte[] first = new byte[6];
            assertEquals(6, body.readNBytes(first, 0, 6)); // "data: " of the role chunk, sent before any token
            body.close();
            gated.permits.release(1000);
            waitFor(() -> s.pending() == 0);
            assertTrue(gated.steps.get() < 60, "generation went on for " + gated.steps.get() + " steps after the client left");
            // the worker is free again
            assertEquals(200, post(s, "/v1/completions", "{\"prompt\":[5],\"max_tokens\":2}").statusCode());
        } finally {
            gated.permits.release(10000);
        }
    }

    interface Io<T> {
        T get() throws Exception;
    }

    static <T> T unchecked(Io<T> f) {
        try {
            return f.get();
        } catch (Exception e) {
            throw new IllegalStateException(e);
        }
    }

    static void waitFor(java.util.function.BooleanSupplier condition) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
        while (!condition.getAsBoolean()) {
            if (System.nanoTime() > deadline) {
                throw new AssertionError("condition not reached in 20 s");
            }
            Thread.sleep(10);
        }
    }
}
