package ai.djl.memopt.inference;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.security.SecureRandom;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.SplittableRandom;
import java.util.function.BooleanSupplier;

/**
 * The decoding loop: left-pads a batch of prompts, feeds them to a {@link LanguageModel} session, then picks one token
 * per sequence per step ({@link LogitsSampler}) until EOS, a stop string, {@code maxNewTokens} or cancellation.
 * Each step's arrays live in a sub-manager closed at the end of the step, so native memory stays flat; only the chosen
 * token ids cross to the host.
 *
 * <p>Each sequence samples from its own random stream seeded with the request's seed, so a sequence gives the same
 * tokens alone or in a batch.
 *
 * <pre>{@code
 * Generator g = new Generator(languageModel, tokenizer);           // tokenizer may be null (ids only, no stop strings)
 * GenerationResult r = g.generate(tokenizer.encode("Hello"), SamplingParams.greedy(32));
 * List<GenerationResult> batch = g.generate(manager, prompts, params, listener, () -> false);
 * }</pre>
 */
public final class Generator {

    /** Prompt tokens fed per prefill call by default. */
    public static final int DEFAULT_PREFILL_CHUNK = 512;

    private final LanguageModel model;
    private final TextTokenizer tokenizer;
    private final List<Long> defaultEosIds;
    private final int prefillChunk;

    /**
     * @param model the model
     * @param tokenizer for text output, stop strings and default EOS ids; may be {@code null}
     */
    public Generator(LanguageModel model, TextTokenizer tokenizer) {
        this(model, tokenizer, null);
    }

    /**
     * @param model the model
     * @param tokenizer for text output and stop strings; may be {@code null}
     * @param defaultEosIds the EOS ids used when the params name none (instead of the tokenizer's); may be {@code null}
     */
    public Generator(LanguageModel model, TextTokenizer tokenizer, List<Long> defaultEosIds) {
        this(model, tokenizer, defaultEosIds, DEFAULT_PREFILL_CHUNK);
    }

    private Generator(LanguageModel model, TextTokenizer tokenizer, List<Long> defaultEosIds, int prefillChunk) {
        this.model = Preconditions.checkNotNull(model, "model");
        this.tokenizer = tokenizer;
        this.defaultEosIds = defaultEosIds == null ? null : ImmutableList.copyOf(defaultEosIds);
        Preconditions.checkArgument(prefillChunk >= 1, "prefill chunk must be >= 1, got %s", prefillChunk);
        this.prefillChunk = prefillChunk;
    }

    /**
     * The same generator feeding prompts in chunks of at most {@code tokens} (default {@value #DEFAULT_PREFILL_CHUNK}):
     * smaller chunks bound the prefill's activation memory (attention scores are (B, heads, chunk, length)).
     */
    public Generator withPrefillChunk(int tokens) {
        return new Generator(model, tokenizer, defaultEosIds, tokens);
    }

    public LanguageModel model() {
        return model;
    }

    /**
     * Checks that prompts of {@code promptTokens} and {@code maxNewTokens} new tokens fit the model's context
     * ({@link LanguageModel#maxLength()}); {@link #generate} does so before allocating anything.
     *
     * @throws ContextLengthException naming both numbers and the context
     */
    public void checkFits(int promptTokens, int maxNewTokens) {
        int context = model.maxLength();
        long total = (long) promptTokens + maxNewTokens;
        if (total > context) {
            throw new ContextLengthException(total, context,
                    "prompt (" + promptTokens + " tokens) + max new tokens (" + maxNewTokens + ") = " + total
                            + " tokens exceed the model's context of " + context + " tokens (max_position_embeddings)");
        }
    }

    /**
     * An estimate of the memory one sequence of {@code promptTokens} + {@code maxNewTokens} holds while it is generated:
     * the host's token arrays (prompt, ids, positions, mask, output: 8-byte ids, 32 bytes per token), the model's
     * cache for every token ({@link LanguageModel#cacheBytesPerToken()}) and the logits of its largest step
     * ({@link LanguageModel#stepLogitsBytes(int)}). Activations inside a step (the prefill's attention scores, bounded
     * by the prefill chunk) are not counted. Servers add these up to bound what they admit.
     */
    public long memoryEstimate(int promptTokens, int maxNewTokens) {
        long length = (long) promptTokens + maxNewTokens;
        return 32 * length + length * model.cacheBytesPerToken() + model.stepLogitsBytes((int) Math.min(length, Integer.MAX_VALUE));
    }

    /** Generates from one prompt, in a manager of its own. */
    public GenerationResult generate(long[] prompt, SamplingParams params) {
        try (NDManager manager = NDManager.newBaseManager(model.device())) {
            return generate(manager, List.of(prompt), params, null, () -> false).get(0);
        }
    }

    /**
     * Generates from a batch of prompts (any lengths; they are left-padded).
     *
     * @param manager parent of the session's and each step's managers (nothing is left in it)
     * @param prompts token ids, at least one token each
     * @param params sampling and stopping
     * @param listener streaming callback, or {@code null}
     * @param cancelled polled before every step; true ends all sequences with {@link FinishReason#CANCELLED}
     */
    public List<GenerationResult> generate(
            NDManager manager, List<long[]> prompts, SamplingParams params, TokenListener listener, BooleanSupplier cancelled) {
        Preconditions.checkArgument(prompts != null && !prompts.isEmpty(), "need at least one prompt");
        int vocab = model.vocabSize();
        for (int i = 0; i < prompts.size(); i++) {
            long[] p = prompts.get(i);
            Preconditions.checkArgument(p != null && p.length > 0, "prompt %s is empty: it needs at least one token", i);
            for (long id : p) {
                Preconditions.checkArgument(
                        id >= 0 && id < vocab, "prompt %s: token id %s is outside the vocabulary [0, %s)", i, id, vocab);
            }
        }
        int maxPrompt = prompts.stream().mapToInt(p -> p.length).max().orElseThrow();
        checkFits(maxPrompt, params.maxNewTokens()); // before any array of that size exists
        List<String> stops = params.stopStrings();
        Preconditions.checkArgument(stops.isEmpty() || tokenizer != null, "stop strings need a tokenizer");
        Set<Long> eos = new HashSet<>();
        if (!params.ignoreEos()) {
            if (params.eosTokenIds() != null) {
                eos.addAll(params.eosTokenIds());
            } else if (defaultEosIds != null) {
                eos.addAll(defaultEosIds);
            } else if (tokenizer != null) {
                eos.addAll(tokenizer.eosIds());
            }
        }
        long padId = eos.isEmpty() ? 0 : eos.iterator().next();

        int b = prompts.size();
        int maxNew = params.maxNewTokens();
        int promptLen = prompts.stream().mapToInt(p -> p.length).max().orElseThrow();
        int maxLen = promptLen + maxNew;

        long[][] out = new long[b][maxNew];
        int[] count = new int[b];
        FinishReason[] reason = new FinishReason[b];
        StopTextTracker[] text = new StopTextTracker[b];
        boolean trackText = tokenizer != null && (listener != null || !stops.isEmpty());
        for (int i = 0; i < b; i++) {
            text[i] = new StopTextTracker(stops);
        }
        SplittableRandom[] rng = new SplittableRandom[b];
        if (!params.isGreedy()) {
            long seed = params.seed().orElseGet(() -> new SecureRandom().nextLong());
            for (int i = 0; i < b; i++) {
                rng[i] = new SplittableRandom(seed);
            }
        }

        // step 0: the left-padded prompts
        long[] ids = new long[b * promptLen];
        long[] pos = new long[b * promptLen];
        long[] mask = new long[b * maxLen]; // row-major (B, maxLen); the first `length` columns are sent each step
        for (int i = 0; i < b; i++) {
            long[] p = prompts.get(i);
            int pad = promptLen - p.length;
            Arrays.fill(ids, i * promptLen, i * promptLen + pad, padId);
            System.arraycopy(p, 0, ids, i * promptLen + pad, p.length);
            for (int j = 0; j < p.length; j++) {
                pos[i * promptLen + pad + j] = j;
                mask[i * maxLen + pad + j] = 1;
            }
        }
        int t = promptLen;
        try (NDManager sessionManager = manager.newSubManager(model.device());
                DecodingSession session = model.newSession(sessionManager, b, maxLen)) {
            // long prompts go in chunks: the attention scores of a chunk are (B, H, chunk, S), not (B, H, T, T)
            int fed = 0;
            while (promptLen - fed > prefillChunk) {
                if (cancelled.getAsBoolean()) {
                    break;
                }
                try (NDManager chunkManager = sessionManager.newSubManager()) {
                    int end = fed + prefillChunk;
                    session.next(
                            chunkManager.create(columns(ids, fed, end, promptLen, b), new Shape(b, prefillChunk)), // (B, C)
                            chunkManager.create(columns(pos, fed, end, promptLen, b), new Shape(b, prefillChunk)),
                            chunkManager.create(columns(mask, b, maxLen, end), new Shape(b, end))); // (B, end)
                }
                fed += prefillChunk;
            }
            if (fed > 0) {
                ids = columns(ids, fed, promptLen, promptLen, b);
                pos = columns(pos, fed, promptLen, promptLen, b);
                t = promptLen - fed;
            }
            for (int step = 0; step < maxNew; step++) {
                if (cancelled.getAsBoolean()) {
                    for (int i = 0; i < b; i++) {
                        if (reason[i] == null) {
                            reason[i] = FinishReason.CANCELLED;
                        }
                    }
                    break;
                }
                int length = session.length() + t;
                long[] next;
                try (NDManager stepManager = sessionManager.newSubManager()) {
                    NDArray inputIds = stepManager.create(ids, new Shape(b, t)); // (B, T)
                    NDArray positionIds = stepManager.create(pos, new Shape(b, t)); // (B, T)
                    NDArray attention = stepManager.create(columns(mask, b, maxLen, length), new Shape(b, length)); // (B, L)
                    NDArray logits = session.next(inputIds, positionIds, attention); // (B, V)
                    double[] u = new double[b];
                    if (!params.isGreedy()) {
                        for (int i = 0; i < b; i++) {
                            u[i] = reason[i] == null ? rng[i].nextDouble() : 0.0;
                        }
                    }
                    next = LogitsSampler.sample(logits, params, u);
                }
                boolean anyActive = false;
                for (int i = 0; i < b; i++) {
                    if (reason[i] != null) {
                        continue;
                    }
                    long token = next[i];
                    out[i][count[i]++] = token;
                    String delta = "";
                    if (eos.contains(token)) {
                        reason[i] = FinishReason.STOP;
                    } else if (trackText) {
                        delta = text[i].update(tokenizer.decode(Arrays.copyOf(out[i], count[i]), true));
                        if (text[i].stopped()) {
                            reason[i] = FinishReason.STOP;
                        }
                    }
                    if (reason[i] == null && count[i] == maxNew) {
                        reason[i] = FinishReason.LENGTH;
                    }
                    if (reason[i] != null && trackText) {
                        delta += text[i].finish();
                    }
                    if (listener != null) {
                        listener.onToken(i, token, delta);
                    }
                    anyActive |= reason[i] == null;
                }
                if (!anyActive) {
                    break;
                }
                // next step: one token per sequence; finished ones are fed padding nobody reads
                int at = session.length();
                t = 1;
                ids = new long[b];
                pos = new long[b];
                for (int i = 0; i < b; i++) {
                    ids[i] = reason[i] == null ? next[i] : padId;
                    pos[i] = prompts.get(i).length + count[i] - 1;
                    mask[i * maxLen + at] = 1;
                }
            }
        }
        List<GenerationResult> results = new ArrayList<>(b);
        for (int i = 0; i < b; i++) {
            long[] generated = Arrays.copyOf(out[i], count[i]);
            String decoded = null;
            if (tokenizer != null) {
                if (text[i].stopped()) {
                    decoded = text[i].finalText();
                } else {
                    decoded = tokenizer.decode(generated, true);
                }
            }
            FinishReason r = reason[i] == null ? FinishReason.LENGTH : reason[i];
            results.add(new GenerationResult(decoded, prompts.get(i).clone(), generated, r));
        }
        return ImmutableList.copyOf(results);
    }

    /** Columns [from, to) of a row-major (B, width) array. */
    private static long[] columns(long[] a, int from, int to, int width, int b) {
        long[] out = new long[b * (to - from)];
        for (int i = 0; i < b; i++) {
            System.arraycopy(a, i * width + from, out, i * (to - from), to - from);
        }
        return out;
    }

    private static long[] columns(long[] mask, int b, int stride, int length) {
        long[] m = new long[b * length];
        for (int i = 0; i < b; i++) {
            System.arraycopy(mask, i * stride, m, i * length, length);
        }
        return m;
    }
}
