package ai.djl.memopt.inference;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.ndarray.NDManager;
import java.io.IOException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

@ExtendWith(OneThread.class)
class GeneratorTest {

    static final int VOCAB = 64;
    static TextTokenizer tokenizer;

    static final long[] P1 = {5};
    static final long[] P2 = {17, 3, 40};
    static final long[] P3 = {9, 9, 12, 60, 33};

    final LanguageModel lm = new RecomputingLanguageModel(new FakeCausalLm(VOCAB), VOCAB, Device.cpu());

    @BeforeAll
    static void load() throws IOException {
        tokenizer = TextTokenizer.fromModelDir(TextTokenizerTest.deepSeekTokenizerDir());
    }

    @AfterAll
    static void close() {
        tokenizer.close();
    }

    @Test
    void greedyFollowsTheModelTokenForToken() {
        Generator g = new Generator(lm, null);
        for (long[] p : List.of(P1, P2, P3)) {
            GenerationResult r = g.generate(p, SamplingParams.greedy(12));
            assertArrayEquals(FakeCausalLm.greedyReference(p, 12, VOCAB), r.outputIds(), Arrays.toString(p));
            assertEquals(FinishReason.LENGTH, r.finishReason());
            assertArrayEquals(p, r.promptIds());
        }
    }

    @Test
    void leftPaddedBatchEqualsOneByOne() {
        Generator g = new Generator(lm, null);
        List<long[]> prompts = List.of(P1, P3, P2);
        for (SamplingParams params :
                List.of(
                        SamplingParams.greedy(10),
                        SamplingParams.builder().setMaxNewTokens(10).optTemperature(1.3f).optTopK(20).optTopP(0.95f).optSeed(11).build())) {
            List<GenerationResult> batch;
            try (NDManager m = NDManager.newBaseManager()) {
                batch = g.generate(m, prompts, params, null, () -> false);
            }
            for (int i = 0; i < prompts.size(); i++) {
                assertArrayEquals(g.generate(prompts.get(i), params).outputIds(), batch.get(i).outputIds(), params + " row " + i);
            }
        }
    }

    @Test
    void chunkedPrefillOfALeftPaddedBatch() {
        Generator g = new Generator(lm, null);
        List<long[]> prompts = List.of(P3, P1, P2);
        SamplingParams params = SamplingParams.greedy(6);
        for (int chunk : new int[] {1, 2, 4}) {
            List<GenerationResult> r;
            try (NDManager m = NDManager.newBaseManager()) {
                r = g.withPrefillChunk(chunk).generate(m, prompts, params, null, () -> false);
            }
            for (int i = 0; i < prompts.size(); i++) {
                assertArrayEquals(FakeCausalLm.greedyReference(prompts.get(i), 6, VOCAB), r.get(i).outputIds(), "chunk " + chunk);
            }
        }
        assertThrows(IllegalArgumentException.class, () -> g.withPrefillChunk(0));
    }

    @Test
    void sameSeedSameTokensOtherSeedOtherTokens() {
        Generator g = new Generator(lm, null);
        SamplingParams.Builder b = SamplingParams.builder().setMaxNewTokens(24).optTemperature(2f);
        long[] a = g.generate(P2, b.optSeed(1).build()).outputIds();
        assertArrayEquals(a, g.generate(P2, b.optSeed(1).build()).outputIds());
        assertNotEquals(Arrays.toString(a), Arrays.toString(g.generate(P2, b.optSeed(2).build()).outputIds()));
        // sampling really samples: at temperature 2 the tokens are not the greedy ones
        assertNotEquals(Arrays.toString(FakeCausalLm.greedyReference(P2, 24, VOCAB)), Arrays.toString(a));
    }

    @Test
    void eosEndsTheSequenceAndIsKept() {
        long[] greedy = FakeCausalLm.greedyReference(P3, 12, VOCAB);
        long eos = greedy[4];
        int first = 0;
        while (greedy[first] != eos) {
            first++;
        }
        Generator g = new Generator(lm, null);
        GenerationResult r = g.generate(P3, SamplingParams.builder().setMaxNewTokens(12).optEosTokenIds(List.of(eos)).build());
        assertArrayEquals(Arrays.copyOf(greedy, first + 1), r.outputIds());
        assertEquals(FinishReason.STOP, r.finishReason());
        r = g.generate(P3, SamplingParams.builder().setMaxNewTokens(12).optEosTokenIds(List.of(eos)).optIgnoreEos(true).build());
        assertArrayEquals(greedy, r.outputIds());
    }

    @Test
    void batchWithOneSequenceStoppingEarly() {
        long[] g3 = FakeCausalLm.greedyReference(P3, 8, VOCAB);
        long eos = g3[1];
        Generator g = new Generator(lm, null);
        SamplingParams params = SamplingParams.builder().setMaxNewTokens(8).optEosTokenIds(List.of(eos)).build();
        List<GenerationResult> batch;
        try (NDManager m = NDManager.newBaseManager()) {
            batch = g.generate(m, List.of(P3, P2), params, null, () -> false);
        }
        assertArrayEquals(g.generate(P3, params).outputIds(), batch.get(0).outputIds());
        assertArrayEquals(g.generate(P2, params).outputIds(), batch.get(1).outputIds());
        assertEquals(FinishReason.STOP, batch.get(0).finishReason());
    }

    @Test
    void stopStringCutsTextAndStreamedDeltasAddUp() {
        Generator g = new Generator(lm, tokenizer);
        // no EOS in this fake vocabulary range, so the full text is the reference
        SamplingParams plain = SamplingParams.builder().setMaxNewTokens(20).optEosTokenIds(List.of()).build();
        GenerationResult full = g.generate(P2, plain);
        String text = full.text();
        assertEquals(tokenizer.decode(full.outputIds(), true), text);
        assertTrue(text.length() >= 10, text);
        String stop = text.substring(6, 8);
        int cut = text.indexOf(stop);

        List<String> deltas = new ArrayList<>();
        List<Long> streamed = new ArrayList<>();
        GenerationResult r;
        try (NDManager m = NDManager.newBaseManager()) {
            r = g.generate(
                            m,
                            List.of(P2),
                            plain.toBuilder().optStopStrings(List.of("never-there", stop)).build(),
                            (i, id, delta) -> {
                                streamed.add(id);
                                deltas.add(delta);
                            },
                            () -> false)
                    .get(0);
        }
        assertEquals(text.substring(0, cut), r.text());
        assertEquals(FinishReason.STOP, r.finishReason());
        assertEquals(r.outputIdList(), streamed);
        assertEquals(r.text(), String.join("", deltas));
        // the ids run up to the token that completed the stop string
        assertTrue(tokenizer.decode(r.outputIds(), true).contains(stop));
        assertTrue(!tokenizer.decode(Arrays.copyOf(r.outputIds(), r.outputIds().length - 1), true).contains(stop));
    }

    @Test
    void streamingWithoutStopsDeliversEveryTokenAndTheWholeText() {
        Generator g = new Generator(lm, tokenizer);
        StringBuilder sb = new StringBuilder();
        AtomicInteger n = new AtomicInteger();
        GenerationResult r;
        try (NDManager m = NDManager.newBaseManager()) {
            r = g.generate(
                            m,
                            List.of(P1),
                            SamplingParams.builder().setMaxNewTokens(15).optEosTokenIds(List.of()).build(),
                            (i, id, delta) -> {
                                n.incrementAndGet();
                                sb.append(delta);
                            },
                            () -> false)
                    .get(0);
        }
        assertEquals(15, n.get());
        assertEquals(r.text(), sb.toString());
    }

    @Test
    void cancellationEndsEverySequence() {
        Generator g = new Generator(lm, null);
        AtomicInteger polls = new AtomicInteger();
        List<GenerationResult> r;
        try (NDManager m = NDManager.newBaseManager()) {
            r = g.generate(m, List.of(P1, P2), SamplingParams.greedy(50), null, () -> polls.incrementAndGet() > 3);
        }
        for (GenerationResult x : r) {
            assertEquals(FinishReason.CANCELLED, x.finishReason());
            assertEquals(3, x.outputIds().length);
        }
    }

    @Test
    void stopTextTrackerHoldsBackPossibleStops() {
        StopTextTracker t = new StopTextTracker(List.of("END"));
        assertEquals("ab", t.update("ab"));
        assertEquals("", t.update("abE")); // could be the start of END
        assertEquals("", t.update("abEN"));
        assertEquals("ENx", t.update("abENx")); // was not
        assertEquals("", t.update("abENx\uFFFD")); // incomplete UTF-8
        assertEquals("é", t.update("abENxé"));
        assertEquals("", t.update("abENxéEND tail"));
        assertTrue(t.stopped());
        assertEquals("abENxé", t.finalText());
    }

    @Test
    void badPromptsAreRejected() {
        Generator g = new Generator(lm, null);
        assertThrows(IllegalArgumentException.class, () -> g.generate(new long[0], SamplingParams.greedy(1)));
        IllegalArgumentException e =
                assertThrows(IllegalArgumentException.class, () -> g.generate(new long[] {3, VOCAB}, SamplingParams.greedy(1)));
        assertTrue(e.getMessage().contains("outside the vocabulary"), e.getMessage());
        assertThrows(
                IllegalArgumentException.class,
                () -> g.generate(P1, SamplingParams.builder().setMaxNewTokens(2).optStopStrings(List.of("x")).build()));
    }

    @Test
    void newTokensBeyondTheContextAreRefusedBeforeAnythingIsAllocated() throws Exception {
        try (TestModel m = TestModel.load(MlaCachedDecoderTest.fixture("tiny-deepseek-v3"), ai.djl.ndarray.types.DataType.FLOAT32)) {
            Generator g = new Generator(new MlaCachedDecoder(m.model(), Device.cpu()), null);
            // 1e9 new tokens once took 8 GB of host arrays and died with OutOfMemoryError before the context check
            IllegalArgumentException e =
                    assertThrows(IllegalArgumentException.class, () -> g.generate(P2, SamplingParams.greedy(1_000_000_000)));
            assertTrue(e.getMessage().contains("1000000003") && e.getMessage().contains("256")
                    && e.getMessage().contains("max_position_embeddings"), e.getMessage());
            e = assertThrows(IllegalArgumentException.class, () -> g.generate(P2, SamplingParams.greedy(254)));
            assertTrue(e.getMessage().contains("257"), e.getMessage());
            assertEquals(253, g.generate(P2, SamplingParams.builder().setMaxNewTokens(253).optIgnoreEos(true).build()).outputIds().length);
        }
    }
}
