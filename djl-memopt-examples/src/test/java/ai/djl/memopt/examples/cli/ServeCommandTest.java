package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.net.ServerSocket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;

class ServeCommandTest {

    @Test
    void servesTheFixtureModelAndStops() throws Exception {
        int port;
        try (ServerSocket s = new ServerSocket(0)) {
            port = s.getLocalPort();
        }
        String v3 = CliRun.FIXTURES.resolve("tiny-deepseek-v3").toString();
        CompletableFuture<Integer> exit =
                CompletableFuture.supplyAsync(
                        () -> MemoptCli.execute("serve", "--model", v3, "--port", String.valueOf(port), "--max-queue", "2", "--shutdown-grace", "1",
                                "--max-pending-bytes", "123456789", "--max-connections", "8", "--read-timeout", "5", "--body-timeout", "7"));
        HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(2)).build();
        URI base = URI.create("http://127.0.0.1:" + port);
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
        while (true) {
            assertTrue(System.nanoTime() < deadline, "server did not come up");
            assertTrue(!exit.isDone(), () -> "serve exited early with " + exit.join());
            try {
                HttpResponse<String> h = http.send(HttpRequest.newBuilder(base.resolve("/health")).build(), HttpResponse.BodyHandlers.ofString());
                if (h.statusCode() == 200 && ServeCommand.running != null) {
                    break;
                }
            } catch (IOException e) {
                Thread.sleep(100);
            }
        }
        HttpResponse<String> r =
                http.send(
                        HttpRequest.newBuilder(base.resolve("/v1/completions"))
                                .POST(HttpRequest.BodyPublishers.ofString("{\"prompt\":[451,340,497,361,133,474],\"max_tokens\":16,\"temperature\":0}"))
                                .build(),
                        HttpResponse.BodyHandlers.ofString());
        assertEquals(200, r.statusCode(), r.body());
        JsonObject o = JsonParser.parseString(r.body()).getAsJsonObject();
        JsonArray ids = o.getAsJsonObject("usage").getAsJsonArray("completion_token_ids");
        for (int i = 0; i < GenerateCommandTest.GREEDY.length; i++) {
            assertEquals(GenerateCommandTest.GREEDY[i], ids.get(i).getAsLong());
        }
        // no tokenizer in the fixture: text prompts are refused with a clear 400
        r = http.send(
                HttpRequest.newBuilder(base.resolve("/v1/completions")).POST(HttpRequest.BodyPublishers.ofString("{\"prompt\":\"hi\"}")).build(),
                HttpResponse.BodyHandlers.ofString());
        assertEquals(400, r.statusCode());

        JsonObject health = JsonParser.parseString(
                http.send(HttpRequest.newBuilder(base.resolve("/health")).build(), HttpResponse.BodyHandlers.ofString()).body()).getAsJsonObject();
        assertEquals(123456789L, health.get("max_pending_bytes").getAsLong());
        assertEquals(8, ServeCommand.running.stats().maxConnections());
        // the fixture's context is 256 tokens: the server refuses what cannot fit, before generating
        r = http.send(
                HttpRequest.newBuilder(base.resolve("/v1/completions"))
                        .POST(HttpRequest.BodyPublishers.ofString("{\"prompt\":[451,340],\"max_tokens\":255}")).build(),
                HttpResponse.BodyHandlers.ofString());
        assertEquals(400, r.statusCode(), r.body());
        assertTrue(r.body().contains("context_length_exceeded"), r.body());

        assertNotNull(ServeCommand.running);
        ServeCommand.running.close();
        assertEquals(0, exit.get(30, TimeUnit.SECONDS));
    }

    @Test
    void chatOverTheFixtureWithATokenizer(@org.junit.jupiter.api.io.TempDir java.nio.file.Path tmp) throws Exception {
        int port;
        try (ServerSocket s = new ServerSocket(0)) {
            port = s.getLocalPort();
        }
        String dir = CliRun.v3WithTokenizer(tmp).toString();
        CompletableFuture<Integer> exit =
                CompletableFuture.supplyAsync(() -> MemoptCli.execute("serve", "--model", dir, "--port", String.valueOf(port)));
        HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(2)).build();
        URI base = URI.create("http://127.0.0.1:" + port);
        awaitHealthy(http, base, exit);
        HttpResponse<String> r =
                http.send(
                        HttpRequest.newBuilder(base.resolve("/v1/chat/completions"))
                                .POST(HttpRequest.BodyPublishers.ofString(
                                        "{\"messages\":[{\"role\":\"user\",\"content\":\"w7\"}],\"max_tokens\":5,\"temperature\":0}"))
                                .build(),
                        HttpResponse.BodyHandlers.ofString());
        assertEquals(200, r.statusCode(), r.body());
        JsonObject o = JsonParser.parseString(r.body()).getAsJsonObject();
        assertEquals(4, o.getAsJsonObject("usage").get("prompt_tokens").getAsInt()); // <s> user w7 assistant
        JsonArray ids = o.getAsJsonObject("usage").getAsJsonArray("completion_token_ids");
        long[] out = new long[ids.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = ids.get(i).getAsLong();
        }
        String content = o.getAsJsonArray("choices").get(0).getAsJsonObject().getAsJsonObject("message").get("content").getAsString();
        assertEquals(CliRun.wordLevelText(out), content);
        ServeCommand.running.close();
        assertEquals(0, exit.get(30, TimeUnit.SECONDS));
    }

    @Test
    void servesWithTheLayersSplitOverStages() throws Exception {
        int port;
        try (ServerSocket s = new ServerSocket(0)) {
            port = s.getLocalPort();
        }
        String v3 = CliRun.FIXTURES.resolve("tiny-deepseek-v3").toString();
        CompletableFuture<Integer> exit = CompletableFuture.supplyAsync(() -> MemoptCli.execute("serve", "--model", v3,
                "--port", String.valueOf(port), "--devices", "cpu,cpu", "--layer-split", "2,1"));
        HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(2)).build();
        URI base = URI.create("http://127.0.0.1:" + port);
        awaitHealthy(http, base, exit);
        HttpResponse<String> r = http.send(HttpRequest.newBuilder(base.resolve("/v1/completions"))
                        .POST(HttpRequest.BodyPublishers.ofString(
                                "{\"prompt\":[451,340,497,361,133,474],\"max_tokens\":16,\"temperature\":0}"))
                        .build(), HttpResponse.BodyHandlers.ofString());
        assertEquals(200, r.statusCode(), r.body());
        JsonArray ids = JsonParser.parseString(r.body()).getAsJsonObject().getAsJsonObject("usage")
                .getAsJsonArray("completion_token_ids");
        assertEquals(java.util.Arrays.toString(GenerateCommandTest.GREEDY), ids.toString().replace(",", ", "));
        ServeCommand.running.close();
        assertEquals(0, exit.get(30, TimeUnit.SECONDS));
    }

    static void awaitHealthy(HttpClient http, URI base, CompletableFuture<Integer> exit) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
        while (true) {
            assertTrue(System.nanoTime() < deadline, "server did not come up");
            assertTrue(!exit.isDone(), () -> "serve exited early with " + exit.join());
            try {
                HttpResponse<String> h = http.send(HttpRequest.newBuilder(base.resolve("/health")).build(), HttpResponse.BodyHandlers.ofString());
                if (h.statusCode() == 200 && ServeCommand.running != null) {
                    return;
                }
            } catch (IOException e) {
                Thread.sleep(100);
            }
        }
    }

    @Test
    void badModelDirExitsWithAnError() {
        CliRun r = CliRun.run("serve", "--model", "/nonexistent/model", "--port", "0");
        assertEquals(1, r.exitCode);
        assertTrue(r.err.contains("/nonexistent/model"), r.err);
    }
}
