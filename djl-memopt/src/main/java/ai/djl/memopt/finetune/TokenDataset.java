package ai.djl.memopt.finetune;

import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer;
import com.google.common.base.Preconditions;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;
import java.util.SplittableRandom;

/**
 * A tokenized corpus packed into fixed-length sequences, with a held-out split and deterministic shuffled batches.
 *
 * <p><b>Tokenization.</b> Each document is encoded on its own with the model's {@code tokenizer.json} (DJL's
 * {@link HuggingFaceTokenizer}, offline) with truncation, padding and the tokenizer's own special tokens off (DJL
 * truncates to 512 tokens by default, and a post-processor would add BOS/EOS to every chunk); a BOS (EOS) token is put
 * before (after) each document when {@code tokenizer_config.json} next to it says {@code add_bos_token}
 * ({@code add_eos_token}), as transformers does per text. The documents' ids are concatenated in order.
 *
 * <p><b>Packing.</b> The stream is cut into {@code N = tokens / seq} consecutive sequences of {@code seq} tokens (the
 * remainder is dropped); the last {@code max(1, round(N * heldOut))} sequences are the held-out split (none when
 * {@code heldOut == 0}), the others the training split.
 *
 * <p><b>Batches.</b> The training rows form an endless stream: epoch {@code e} is a permutation of the training
 * sequences drawn from {@code (seed, e)}; {@link #trainBatch(long, int)} returns the rows at stream positions
 * {@code [position, position + rows)}, so a run that saved its position resumes with exactly the batches it would have
 * seen.
 *
 * <pre>{@code
 * TokenDataset data = TokenDataset.tokenize(TextCorpus.read(dir), modelDir.resolve("tokenizer.json"), 512, 0.05, 42);
 * TokenBatch batch = data.trainBatch(0, 8);   // (8, 512)
 * }</pre>
 */
public final class TokenDataset {

    private final int[] tokens;
    private final int seq;
    private final int trainSequences;
    private final int heldOutSequences;
    private final long seed;
    private long cachedEpoch = -1;
    private int[] cachedPermutation;

    private TokenDataset(int[] tokens, int seq, int train, int heldOut, long seed) {
        this.tokens = tokens;
        this.seq = seq;
        this.trainSequences = train;
        this.heldOutSequences = heldOut;
        this.seed = seed;
    }

    /**
     * Tokenizes and packs a corpus.
     *
     * @param tokenizerJson a {@code tokenizer.json} (its directory's {@code tokenizer_config.json} is read if present)
     * @param seq tokens per sequence, >= 2
     * @param heldOut fraction of sequences held out, in [0, 0.5]
     * @param seed shuffling seed
     * @throws IllegalArgumentException if the tokenizer is missing or the text is too short for one training sequence
     * @throws IOException if a file cannot be read
     */
    public static TokenDataset tokenize(TextCorpus corpus, Path tokenizerJson, int seq, double heldOut, long seed)
            throws IOException {
        Preconditions.checkArgument(Files.isRegularFile(tokenizerJson), "tokenizer %s does not exist", tokenizerJson);
        SpecialTokens special = SpecialTokens.read(tokenizerJson);
        Map<String, String> options = new HashMap<>();
        options.put("truncation", "false");
        options.put("padding", "false");
        options.put("addSpecialTokens", "false");
        options.put("modelMaxLength", Integer.toString(Integer.MAX_VALUE));
        long total = 0;
        int[][] docs = new int[corpus.size()][];
        try (HuggingFaceTokenizer tokenizer = HuggingFaceTokenizer.newInstance(tokenizerJson, options)) {
            for (int d = 0; d < corpus.size(); d++) {
                long[] ids = tokenizer.encode(corpus.texts().get(d), false, false).getIds();
                int extra = (special.bos >= 0 ? 1 : 0) + (special.eos >= 0 ? 1 : 0);
                int[] doc = new int[ids.length + extra];
                int k = 0;
                if (special.bos >= 0) {
                    doc[k++] = special.bos;
                }
                for (long id : ids) {
                    doc[k++] = Math.toIntExact(id);
                }
                if (special.eos >= 0) {
                    doc[k] = special.eos;
                }
                docs[d] = doc;
                total += doc.length;
            }
        }
        Preconditions.checkArgument(total <= Integer.MAX_VALUE, "corpus too large: %s tokens", total);
        int[] stream = new int[(int) total];
        int at = 0;
        for (int[] doc : docs) {
            System.arraycopy(doc, 0, stream, at, doc.length);
            at += doc.length;
        }
        return fromTokens(stream, seq, heldOut, seed);
    }

    /** Packs an already tokenized stream (see the class documentation). */
    public static TokenDataset fromTokens(int[] stream, int seq, double heldOut, long seed) {
        Preconditions.checkArgument(seq >= 2, "sequence length must be >= 2, got %s", seq);
        Preconditions.checkArgument(heldOut >= 0 && heldOut <= 0.5, "held-out fraction must be in [0, 0.5], got %s",
                heldOut);
        int n = stream.length / seq;
        int held = heldOut == 0 ? 0 : (int) Math.max(1, Math.round(n * heldOut));
        Preconditions.checkArgument(n - held >= 1,
                "the text has %s tokens: too short for one training sequence of %s tokens%s", stream.length, seq,
                held > 0 ? " plus " + held + " held-out sequence(s)" : "");
        return new TokenDataset(stream, seq, n - held, held, seed);
    }

    /**
     * The identity of this data for a training run ({@link RunIdentity}): {@code data} is the SHA-256 of the token
     * stream with its length, {@code seq} the sequence length and {@code held_out} the training and held-out
     * sequence counts. (The shuffling seed is the run's {@code seed}.)
     */
    public Map<String, String> identity() {
        ByteBuffer bytes = ByteBuffer.allocate(4 * tokens.length).order(ByteOrder.LITTLE_ENDIAN);
        bytes.asIntBuffer().put(tokens);
        return Map.of("data", "sha256:" + RunIdentity.sha256(bytes.array()).substring(0, 16) + " ("
                        + tokens.length + " tokens)", "seq", Integer.toString(seq),
                "held_out", trainSequences + " training + " + heldOutSequences + " held-out sequences");
    }

    /** Tokens per sequence. */
    public int seq() {
        return seq;
    }

    /** Number of tokens in the corpus (before packing). */
    public int tokenCount() {
        return tokens.length;
    }

    /** Number of training sequences (one epoch). */
    public int trainSequences() {
        return trainSequences;
    }

    /** Number of held-out sequences. */
    public int heldOutSequences() {
        return heldOutSequences;
    }

    public long seed() {
        return seed;
    }

    /** The largest token id in the corpus. */
    public int maxTokenId() {
        int m = 0;
        for (int t : tokens) {
            m = Math.max(m, t);
        }
        return m;
    }

    /** Rows at stream positions {@code [position, position + rows)} of the shuffled training stream. */
    public synchronized TokenBatch trainBatch(long position, int rows) {
        Preconditions.checkArgument(position >= 0 && rows >= 1, "bad batch position %s / rows %s", position, rows);
        long[] ids = new long[rows * seq];
        for (int r = 0; r < rows; r++) {
            long p = position + r;
            long epoch = p / trainSequences;
            int index = permutation(epoch)[(int) (p % trainSequences)];
            copySequence(index, ids, r);
        }
        return new TokenBatch(ids, rows, seq);
    }

    /** Held-out sequences {@code [from, to)} (in corpus order). */
    public TokenBatch heldOutBatch(int from, int to) {
        Preconditions.checkArgument(0 <= from && from < to && to <= heldOutSequences,
                "bad held-out range [%s, %s) of %s sequences", from, to, heldOutSequences);
        long[] ids = new long[(to - from) * seq];
        for (int r = 0; r < to - from; r++) {
            copySequence(trainSequences + from + r, ids, r);
        }
        return new TokenBatch(ids, to - from, seq);
    }

    private void copySequence(int index, long[] out, int row) {
        int base = index * seq;
        for (int i = 0; i < seq; i++) {
            out[row * seq + i] = tokens[base + i];
        }
    }

    private int[] permutation(long epoch) {
        if (epoch != cachedEpoch) {
            int[] p = new int[trainSequences];
            for (int i = 0; i < p.length; i++) {
                p[i] = i;
            }
            SplittableRandom random = new SplittableRandom(seed * 0x9E3779B97F4A7C15L + epoch);
            for (int i = p.length - 1; i > 0; i--) { // Fisher-Yates
                int j = random.nextInt(i + 1);
                int t = p[i];
                p[i] = p[j];
                p[j] = t;
            }
            cachedPermutation = p;
            cachedEpoch = epoch;
        }
        return cachedPermutation;
    }

    /** BOS/EOS ids to add per document, from tokenizer_config.json ({@code -1} = none). */
    static final class SpecialTokens {
        final int bos;
        final int eos;

        private SpecialTokens(int bos, int eos) {
            this.bos = bos;
            this.eos = eos;
        }

        static SpecialTokens read(Path tokenizerJson) throws IOException {
            Path dir = tokenizerJson.toAbsolutePath().getParent();
            Path configFile = dir.resolve("tokenizer_config.json");
            if (!Files.isRegularFile(configFile)) {
                return new SpecialTokens(-1, -1);
            }
            JsonObject config = parse(configFile);
            JsonObject tokenizer = null;
            int bos = -1;
            int eos = -1;
            if (flag(config, "add_bos_token")) {
                tokenizer = parse(tokenizerJson);
                bos = idOf(tokenizer, tokenString(config, "bos_token", configFile), tokenizerJson);
            }
            if (flag(config, "add_eos_token")) {
                tokenizer = tokenizer != null ? tokenizer : parse(tokenizerJson);
                eos = idOf(tokenizer, tokenString(config, "eos_token", configFile), tokenizerJson);
            }
            return new SpecialTokens(bos, eos);
        }

        private static JsonObject parse(Path file) throws IOException {
            try {
                return JsonParser.parseString(Files.readString(file, StandardCharsets.UTF_8)).getAsJsonObject();
            } catch (RuntimeException e) {
                throw new IOException(file + " is not a JSON object: " + e.getMessage(), e);
            }
        }

        private static boolean flag(JsonObject o, String key) {
            JsonElement e = o.get(key);
            return e != null && e.isJsonPrimitive() && e.getAsBoolean();
        }

        /** {@code "<s>"} or transformers' AddedToken form {@code {"content": "<s>", ...}}. */
        private static String tokenString(JsonObject config, String key, Path file) {
            JsonElement e = config.get(key);
            if (e != null && e.isJsonPrimitive()) {
                return e.getAsString();
            }
            if (e != null && e.isJsonObject() && e.getAsJsonObject().has("content")) {
                return e.getAsJsonObject().get("content").getAsString();
            }
            throw new IllegalArgumentException(file + " sets add_" + key + " but has no " + key + " string");
        }

        private static int idOf(JsonObject tokenizer, String token, Path file) {
            if (tokenizer.has("added_tokens") && tokenizer.get("added_tokens").isJsonArray()) {
                for (JsonElement e : tokenizer.getAsJsonArray("added_tokens")) {
                    JsonObject t = e.getAsJsonObject();
                    if (token.equals(t.get("content").getAsString())) {
                        return t.get("id").getAsInt();
                    }
                }
            }
            JsonObject model = tokenizer.has("model") ? tokenizer.getAsJsonObject("model") : null;
            if (model != null && model.has("vocab") && model.get("vocab").isJsonObject()
                    && model.getAsJsonObject("vocab").has(token)) {
                return model.getAsJsonObject("vocab").get(token).getAsInt();
            }
            throw new IllegalArgumentException(file + " has no token '" + token + "' (named by tokenizer_config.json)");
        }
    }
}
