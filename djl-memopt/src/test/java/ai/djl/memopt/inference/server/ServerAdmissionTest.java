package ai.djl.memopt.inference.server;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.inference.FakeLms;
import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.OneThread;
import ai.djl.memopt.inference.TextTokenizer;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.net.http.HttpResponse;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

/**
 * What one client can make the server do is bounded before the work is done: the text it tokenizes, and the memory
 * the admitted requests hold together. Asserted on the server's admission accounting, not on time.
 */
@ExtendWith(OneThread.class)
class ServerAdmissionTest {

    static final int CONTEXT = 64;
    static final long BUDGET = 64L << 20;
    static TextTokenizer deepSeek;

    @BeforeAll
    static void load() throws IOException {
        deepSeek = FakeLms.deepSeekTokenizer();
    }

    @AfterAll
    static void close() {
        deepSeek.close();
    }

    /** What {@link Generator#memoryEstimate} gives for the fake model, from its parts (host ids, cache, logits). */
    static long estimate(int prompt, int max) {
        long length = prompt + max;
        return 32 * length + 16 * length + 4L * FakeLms.BIG_VOCAB * length; // recomputing: (1, length, V) FP32 logits
    }

    static String textBody(String text, int maxTokens) {
        return "{\"prompt\":" + new com.google.gson.Gson().toJson(text) + ",\"max_tokens\":" + maxTokens + "}";
    }

    static JsonObject error(HttpResponse<String> r) {
        return JsonParser.parseString(r.body()).getAsJsonObject().getAsJsonObject("error");
    }

    @Test
    void theEstimateIsTheSumOfItsParts() {
        Generator g = new Generator(FakeLms.bigVocab(), deepSeek);
        assertEquals(estimate(4, 32), g.memoryEstimate(4, 32));
        assertEquals(18_618_048L, estimate(4, 32)); // by hand: 36 tokens x (32 + 16 + 4 x 129,280)
    }

    @Test
    void aTextCertainlyTooLongIsRefusedWithoutTokenizing() throws Exception {
        try (GenerationServer s = GenerationServer.builder().setGenerator(new Generator(FakeLms.bigVocab(), deepSeek)).optTokenizer(deepSeek)
                .optPort(0).optMaxContextLength(CONTEXT).optMaxTokens(32).build().start()) {
            // DeepSeek-V3's tokens cover at most 128 bytes: 63 tokens are at most 8,064 bytes
            HttpResponse<String> r = GenerationServerTest.post(s, "/v1/completions", textBody("x".repeat(63 * 128 + 1), 1));
            assertEquals(400, r.statusCode(), r.body());
            assertEquals("context_length_exceeded", error(r).get("code").getAsString());
            assertEquals("prompt", error(r).get("param").getAsString());
            assertTrue(error(r).get("message").getAsString().contains("without tokenizing"), r.body());
            assertEquals(1, s.stats().refusedUntokenized());
            assertEquals(0, s.stats().tokenizedPrompts());
            // max_tokens takes its room first: 32 leave 32 prompt tokens, 4,096 bytes at most
            r = GenerationServerTest.post(s, "/v1/completions", textBody("x".repeat(32 * 128 + 1), 32));
            assertEquals(400, r.statusCode(), r.body());
            assertEquals(2, s.stats().refusedUntokenized());
            // under the bound the text is tokenized, and refused if its tokens do not fit (" a" is one token each)
            r = GenerationServerTest.post(s, "/v1/completions", textBody(" a".repeat(40), 32));
            assertEquals(400, r.statusCode(), r.body());
            assertEquals("context_length_exceeded", error(r).get("code").getAsString());
            assertEquals(1, s.stats().tokenizedPrompts());
            r = GenerationServerTest.post(s, "/v1/chat/completions",
                    "{\"messages\":[{\"role\":\"user\",\"content\":\"" + "y".repeat(CONTEXT * 128) + "\"}],\"max_tokens\":4}");
            assertEquals(400, r.statusCode(), r.body());
            assertEquals("messages", error(r).get("param").getAsString());
            assertEquals(3, s.stats().refusedUntokenized());
            assertEquals(200, GenerationServerTest.post(s, "/v1/completions", textBody(" a".repeat(20), 2)).statusCode());
            assertEquals(2, s.stats().tokenizedPrompts());
            GenerationServerTest.waitFor(() -> s.stats().pendingBytes() == 0); // the hold goes once the answer is written
        }
    }

    @Test
    void withoutABoundPerTokenTheTokenizerWorkIsAdmittedFirst() throws Exception {
        // a word-level tokenizer has no bound (one unknown word of any length is one token): its work is admitted
        try (TextTokenizer words = FakeLms.wordLevelTokenizer();
                GenerationServer s = GenerationServer.builder().setGenerator(new Generator(FakeLms.bigVocab(), words)).optTokenizer(words)
                        .optPort(0).optMaxContextLength(CONTEXT).optMaxBodyBytes(1 << 20).optMaxPendingBytes(BUDGET).build().start()) {
            // 500 KB could be 500,000 tokens, 200 MB of tokenizer memory: more than the whole budget, refused untokenized
            HttpResponse<String> r = GenerationServerTest.post(s, "/v1/completions", textBody("w7 ".repeat(170_000), 1));
            assertEquals(413, r.statusCode(), r.body());
            assertEquals("request_too_large", error(r).get("code").getAsString());
            assertEquals(0, s.stats().tokenizedPrompts());
            // 100 KB (40 MB of tokenizer memory) is admitted, tokenized, then refused for the context
            r = GenerationServerTest.post(s, "/v1/completions", textBody("w7 ".repeat(34_000), 1));
            assertEquals(400, r.statusCode(), r.body());
            assertEquals("context_length_exceeded", error(r).get("code").getAsString());
            assertEquals(1, s.stats().tokenizedPrompts());
            assertTrue(s.stats().peakPendingBytes() >= TextTokenizer.encodeMemoryEstimate(102_000), s.stats().toString());
            assertTrue(s.stats().peakPendingBytes() <= BUDGET, s.stats().toString());
            assertEquals(0, s.stats().pendingBytes());
        }
    }

    @Test
    void manyOversizedRequestsAtOnceLeaveTheServerResponsiveAndItsMemoryBounded() throws Exception {
        GenerationServerTest.GatedLm gated = new GenerationServerTest.GatedLm(FakeLms.bigVocab());
        ExecutorService clients = Executors.newFixedThreadPool(24);
        long one = estimate(4, 8);
        long budget = 3 * one + one / 2; // room for three requests of 4 + 8 tokens
        try (GenerationServer s = GenerationServer.builder().setGenerator(new Generator(gated, deepSeek)).optTokenizer(deepSeek).optPort(0)
                .optMaxContextLength(CONTEXT).optMaxTokens(32).optMaxQueue(8).optMaxBodyBytes(1 << 20)
                .optMaxPendingBytes(budget).build().start()) {
            String ids = "{\"prompt\":[5,6,7,8],\"max_tokens\":8,\"temperature\":0}";
            Future<HttpResponse<String>> running = clients.submit(() -> GenerationServerTest.post(s, "/v1/completions", ids));
            GenerationServerTest.waitFor(() -> gated.permits.hasQueuedThreads()); // the worker is held at its first step
            assertEquals(one, s.stats().pendingBytes());

            String hugeText = textBody("z".repeat(900_000), 8); // in the body limit, far over the context
            String overLimit = textBody("z".repeat(1_100_000), 8); // over the 1 MiB body limit
            List<Future<HttpResponse<String>>> storm = new ArrayList<>();
            for (int i = 0; i < 23; i++) {
                String body = i % 3 == 0 ? ids : i % 3 == 1 ? hugeText : overLimit;
                storm.add(clients.submit(() -> GenerationServerTest.post(s, "/v1/completions", body)));
            }
            // the server answers others while the storm is on
            HttpResponse<String> h = ServerConnectionsTest.health(s, java.time.Duration.ofSeconds(30));
            assertEquals(200, h.statusCode());
            // all but the admitted two are answered at once; the admitted wait for the worker
            GenerationServerTest.waitFor(() -> {
                assertTrue(s.stats().pendingBytes() <= budget);
                return storm.stream().filter(Future::isDone).count() == storm.size() - 2;
            });
            Map<Integer, Integer> statuses = new TreeMap<>();
            List<Future<HttpResponse<String>>> admitted = new ArrayList<>();
            for (Future<HttpResponse<String>> f : storm) {
                if (f.isDone()) {
                    statuses.merge(f.get().statusCode(), 1, Integer::sum);
                } else {
                    admitted.add(f);
                }
            }
            // 8 id requests: the budget holds 3 (the running one + 2), though 9 requests may be admitted; 6 get 429 at once
            assertEquals(Map.of(400, 8, 413, 7, 429, 6), statuses, s.stats().toString());
            assertEquals(2, admitted.size());
            ServerStats st = s.stats();
            assertTrue(st.peakPendingBytes() <= budget, st.toString());
            assertEquals(3 * one, st.peakPendingBytes());
            assertEquals(3, st.peakPending());
            assertEquals(0, st.tokenizedPrompts(), "no oversized text was tokenized");
            assertEquals(8, st.refusedUntokenized());
            gated.permits.release(100_000);
            assertEquals(200, running.get(60, TimeUnit.SECONDS).statusCode());
            for (Future<HttpResponse<String>> f : admitted) {
                assertEquals(200, f.get(60, TimeUnit.SECONDS).statusCode());
            }
            GenerationServerTest.waitFor(() -> s.pending() == 0);
            assertEquals(0, s.stats().pendingBytes());
        } finally {
            gated.permits.release(100_000);
            clients.shutdownNow();
        }
    }
}
