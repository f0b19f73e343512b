package ai.djl.memopt.inference;

import ai.djl.huggingface.tokenizers.Encoding;
import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer;
import com.google.common.collect.ImmutableList;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.OptionalInt;

/**
 * A Hugging Face tokenizer read from a model directory, with the special-token conventions transformers applies on
 * top of {@code tokenizer.json}.
 *
 * <ul>
 *   <li>{@code tokenizer.json}: the tokenizer itself (DJL's Rust {@code tokenizers} binding; the CPU build of the native
 *       library ships inside the {@code ai.djl.huggingface:tokenizers} jar and is used offline).
 *   <li>{@code tokenizer_config.json} (optional): {@code add_bos_token}/{@code add_eos_token} (transformers' Llama
 *       tokenizers rewrite the post-processor from these, so they win over {@code tokenizer.json}), {@code bos_token},
 *       {@code eos_token}, {@code chat_template} (else {@code chat_template.jinja} or {@code chat_template.json}),
 *       {@code clean_up_tokenization_spaces}.
 *   <li>{@code generation_config.json}, else {@code config.json}: {@code eos_token_id} (an id or a list), the ids that
 *       end generation.
 * </ul>
 *
 * <pre>{@code
 * try (TextTokenizer tok = TextTokenizer.fromModelDir(dir)) {
 *     long[] ids = tok.encode("Hello");              // BOS + tokens when add_bos_token
 *     String text = tok.decode(ids, true);          // special tokens skipped
 * }
 * }</pre>
 */
public final class TextTokenizer implements AutoCloseable {

    static {
        // DJL would otherwise look for a CUDA build of the tokenizers library on a GPU machine and download it; the
        // CPU build in the jar is all tokenization needs. Telemetry (EC2 metadata call) is off too.
        if (System.getProperty("RUST_FLAVOR") == null && System.getenv("RUST_FLAVOR") == null) {
            System.setProperty("RUST_FLAVOR", "cpu");
        }
        if (System.getProperty("OPT_OUT_TRACKING") == null && System.getenv("OPT_OUT_TRACKING") == null) {
            System.setProperty("OPT_OUT_TRACKING", "true");
        }
    }

    private final HuggingFaceTokenizer tokenizer;
    private final Boolean addBos; // null: tokenizer.json's own post-processor decides
    private final boolean addEos;
    private final String bosToken;
    private final String eosToken;
    private final Long bosId;
    private final List<Long> eosIds;
    private final ChatTemplate chatTemplate;
    private final boolean cleanUpSpaces;
    private final OptionalInt maxBytesPerToken;

    private TextTokenizer(
            HuggingFaceTokenizer tokenizer,
            Boolean addBos,
            boolean addEos,
            String bosToken,
            String eosToken,
            Long bosId,
            List<Long> eosIds,
            ChatTemplate chatTemplate,
            boolean cleanUpSpaces,
            OptionalInt maxBytesPerToken) {
        this.tokenizer = tokenizer;
        this.addBos = addBos;
        this.addEos = addEos;
        this.bosToken = bosToken;
        this.eosToken = eosToken;
        this.bosId = bosId;
        this.eosIds = eosIds;
        this.chatTemplate = chatTemplate;
        this.cleanUpSpaces = cleanUpSpaces;
        this.maxBytesPerToken = maxBytesPerToken;
    }

    /**
     * Loads {@code tokenizer.json} and the optional configs of a model directory: of a quantized artifact only the files
     * its manifest lists ({@link ModelFiles#of}).
     *
     * @throws IOException if {@code tokenizer.json} is missing (or not listed) or a config file is unreadable or malformed
     */
    public static TextTokenizer fromModelDir(Path modelDir) throws IOException {
        return fromFiles(ModelFiles.of(modelDir));
    }

    /**
     * Loads {@code tokenizer.json} and the optional configs from the files given: no other file is opened.
     *
     * @throws IOException if {@code tokenizer.json} is not among them or a config file is unreadable or malformed
     */
    public static TextTokenizer fromFiles(ModelFiles files) throws IOException {
        Path json = files.require("tokenizer.json", "a tokenizer");
        Path modelDir = files.dir();
        OptionalInt bound = maxBytesPerToken(json);
        // DJL's defaults truncate to 512 tokens and pad: generation wants neither
        Map<String, String> options =
                Map.of(
                        "addSpecialTokens", "false",
                        "truncation", "false",
                        "padding", "false",
                        "modelMaxLength", String.valueOf(Integer.MAX_VALUE));
        HuggingFaceTokenizer hf;
        try {
            hf = HuggingFaceTokenizer.newInstance(json, options);
        } catch (RuntimeException e) {
            throw new IOException("cannot load tokenizer " + json + ": " + e.getMessage(), e);
        }
        try {
            JsonObject tc = readJson(files.find("tokenizer_config.json"));
            Boolean addBos = null;
            boolean addEos = false;
            String bos = null;
            String eos = null;
            ChatTemplate template = null;
            boolean cleanUp = false;
            if (tc != null) {
                if (tc.has("add_bos_token") && !tc.get("add_bos_token").isJsonNull()) {
                    addBos = tc.get("add_bos_token").getAsBoolean();
                }
                if (tc.has("add_eos_token") && !tc.get("add_eos_token").isJsonNull()) {
                    addEos = tc.get("add_eos_token").getAsBoolean();
                }
                bos = tokenText(tc.get("bos_token"));
                eos = tokenText(tc.get("eos_token"));
                cleanUp = tc.has("clean_up_tokenization_spaces") && tc.get("clean_up_tokenization_spaces").getAsBoolean();
                JsonElement ct = tc.get("chat_template");
                if (ct != null && ct.isJsonPrimitive()) {
                    template = ChatTemplate.of(ct.getAsString(), bos, eos);
                } else if (ct != null && ct.isJsonArray()) {
                    // the list form: [{"name": "default", "template": "..."}, ...]
                    for (JsonElement e : ct.getAsJsonArray()) {
                        JsonObject o = e.getAsJsonObject();
                        if ("default".equals(o.get("name").getAsString())) {
                            template = ChatTemplate.of(o.get("template").getAsString(), bos, eos);
                        }
                    }
                }
            }
            if (template == null) {
                template = separateChatTemplate(files, bos, eos);
            }
            Long bosId = bos == null ? null : singleId(hf, bos, "bos_token");
            List<Long> eosIds = readEosIds(files);
            if (eosIds.isEmpty() && eos != null) {
                eosIds = List.of(singleId(hf, eos, "eos_token"));
            }
            if (Boolean.TRUE.equals(addBos) && bosId == null) {
                throw new IOException(modelDir.resolve("tokenizer_config.json") + ": add_bos_token is true but there is no bos_token");
            }
            return new TextTokenizer(hf, addBos, addEos, bos, eos, bosId, ImmutableList.copyOf(eosIds), template, cleanUp, bound);
        } catch (IOException | RuntimeException e) {
            hf.close();
            throw e;
        }
    }

    /** Newer transformers save the template beside the config: {@code chat_template.jinja}, or {@code chat_template.json}. */
    private static ChatTemplate separateChatTemplate(ModelFiles files, String bos, String eos) throws IOException {
        Optional<Path> jinja = files.find("chat_template.jinja");
        if (jinja.isPresent()) {
            return ChatTemplate.of(Files.readString(jinja.get(), StandardCharsets.UTF_8), bos, eos);
        }
        JsonObject o = readJson(files.find("chat_template.json"));
        if (o != null && o.has("chat_template") && o.get("chat_template").isJsonPrimitive()) {
            return ChatTemplate.of(o.get("chat_template").getAsString(), bos, eos);
        }
        return null;
    }

    /** The most input bytes one token covers ({@link TokenBounds}), read from {@code tokenizer.json}. */
    private static OptionalInt maxBytesPerToken(Path tokenizerJson) throws IOException {
        try (Reader in = Files.newBufferedReader(tokenizerJson, StandardCharsets.UTF_8)) {
            return TokenBounds.maxBytesPerToken(in);
        } catch (IOException e) {
            throw new IOException(tokenizerJson + ": " + e.getMessage(), e);
        }
    }

    private static JsonObject readJson(Optional<Path> file) throws IOException {
        if (file.isEmpty()) {
            return null;
        }
        try {
            JsonElement e = JsonParser.parseString(Files.readString(file.get(), StandardCharsets.UTF_8));
            if (!e.isJsonObject()) {
                throw new IOException(file.get() + ": expected a JSON object");
            }
            return e.getAsJsonObject();
        } catch (JsonParseException e) {
            throw new IOException(file.get() + ": malformed JSON: " + e.getMessage(), e);
        }
    }

    private static String tokenText(JsonElement e) {
        if (e == null || e.isJsonNull()) {
            return null;
        }
        if (e.isJsonPrimitive()) {
            return e.getAsString();
        }
        if (e.isJsonObject() && e.getAsJsonObject().has("content")) {
            return e.getAsJsonObject().get("content").getAsString(); // AddedToken form
        }
        return null;
    }

    private static long singleId(HuggingFaceTokenizer hf, String token, String field) throws IOException {
        long[] ids = hf.encode(token, false, false).getIds();
        if (ids.length != 1) {
            throw new IOException(
                    "tokenizer_config.json " + field + " '" + token + "' is not a single token of tokenizer.json (encodes to "
                            + ids.length + " tokens)");
        }
        return ids[0];
    }

    /**
     * {@code eos_token_id} of a model directory: from generation_config.json, else config.json; empty if neither has it.
     * Of a quantized artifact only listed files are read ({@link ModelFiles#of}).
     *
     * @throws IOException if a file is unreadable or the field malformed
     */
    public static List<Long> readEosIds(Path modelDir) throws IOException {
        return readEosIds(ModelFiles.of(modelDir));
    }

    /** {@code eos_token_id} from the files given: generation_config.json, else config.json; empty if neither has it. */
    public static List<Long> readEosIds(ModelFiles files) throws IOException {
        for (String name : new String[] {"generation_config.json", "config.json"}) {
            Optional<Path> file = files.find(name);
            JsonObject o = readJson(file);
            if (o == null || !o.has("eos_token_id") || o.get("eos_token_id").isJsonNull()) {
                continue;
            }
            JsonElement e = o.get("eos_token_id");
            List<Long> ids = new ArrayList<>();
            try {
                if (e.isJsonArray()) {
                    for (JsonElement x : (JsonArray) e) {
                        ids.add(x.getAsLong());
                    }
                } else {
                    ids.add(e.getAsLong());
                }
            } catch (RuntimeException ex) {
                throw new IOException(file.get() + ": eos_token_id must be an integer or a list of integers, got " + e, ex);
            }
            return ids;
        }
        return List.of();
    }

    /** Encodes text as a prompt: with BOS (and EOS) as the tokenizer config asks. */
    public long[] encode(String text) {
        return encode(text, true);
    }

    /**
     * Encodes text.
     *
     * @param addSpecialTokens false for text that already holds its special tokens (a rendered chat template)
     */
    public long[] encode(String text, boolean addSpecialTokens) {
        if (addBos == null) {
            // no tokenizer_config.json opinion: tokenizer.json's post-processor decides
            return tokenizer.encode(text, addSpecialTokens, false).getIds();
        }
        Encoding enc = tokenizer.encode(text, false, false);
        long[] ids = enc.getIds();
        if (!addSpecialTokens) {
            return ids;
        }
        boolean bos = addBos && bosId != null;
        Long eosId = addEos && eosToken != null && !eosIds.isEmpty() ? eosIds.get(0) : null;
        if (!bos && eosId == null) {
            return ids;
        }
        long[] out = new long[ids.length + (bos ? 1 : 0) + (eosId != null ? 1 : 0)];
        int pos = 0;
        if (bos) {
            out[pos++] = bosId;
        }
        System.arraycopy(ids, 0, out, pos, ids.length);
        if (eosId != null) {
            out[out.length - 1] = eosId;
        }
        return out;
    }

    /**
     * Encodes text that may give at most {@code maxTokens} tokens. A text certainly longer than that is refused without
     * tokenizing it: with a bound of {@code b} bytes per token ({@link #maxBytesPerToken()}), {@code n} UTF-8 bytes are
     * at least {@code ceil(n / b)} tokens. Otherwise the text is tokenized and its length checked.
     *
     * @throws ContextLengthException if the text gives (or certainly would give) more than {@code maxTokens} tokens
     * @throws IllegalArgumentException if the text holds an unpaired surrogate (it is not Unicode text)
     */
    public long[] encode(String text, boolean addSpecialTokens, int maxTokens) {
        long bytes = utf8Length(text);
        long fewest = fewestTokens(bytes);
        if (fewest > maxTokens) {
            throw new ContextLengthException(fewest, maxTokens,
                    "the text is " + bytes + " bytes of UTF-8, at least " + fewest + " tokens (a token of this tokenizer"
                            + " covers at most " + maxBytesPerToken.getAsInt() + " bytes), more than the " + maxTokens
                            + " tokens allowed; refused without tokenizing");
        }
        long[] ids = encode(text, addSpecialTokens);
        if (ids.length > maxTokens) {
            throw new ContextLengthException(ids.length, maxTokens,
                    "the text is " + ids.length + " tokens, more than the " + maxTokens + " tokens allowed");
        }
        return ids;
    }

    /**
     * The most input bytes a single token covers, when this tokenizer has such a bound (byte-level BPE and BPE without
     * fused unknown tokens; see {@link TokenBounds}); empty when one token may cover arbitrarily much text.
     */
    public OptionalInt maxBytesPerToken() {
        return maxBytesPerToken;
    }

    /** The fewest tokens a text of {@code utf8Bytes} can give: {@code ceil(bytes / maxBytesPerToken)}, 0 without a bound. */
    public long fewestTokens(long utf8Bytes) {
        return maxBytesPerToken.isPresent() ? (utf8Bytes + maxBytesPerToken.getAsInt() - 1) / maxBytesPerToken.getAsInt() : 0;
    }

    /**
     * The most tokens a text of {@code utf8Bytes} can give: every token covers at least one byte, plus the special
     * tokens the post-processor adds (at most {@value #MAX_ADDED_TOKENS}).
     */
    public static long mostTokens(long utf8Bytes) {
        return utf8Bytes + MAX_ADDED_TOKENS;
    }

    /** Special tokens a post-processor adds around one text, at most (BOS, EOS, a prefix space). */
    public static final int MAX_ADDED_TOKENS = 8;

    /**
     * Memory one tokenization takes per resulting token while it runs: the Rust encoding (ids, type ids, offsets,
     * masks, the token strings) and DJL's Java copy of it. Measured here on the DeepSeek-V3 tokenizer, a 1.3 MB text of
     * 786,433 tokens: +130 bytes/token of Java heap and +323 bytes/token of process RSS on a first encode; 16 parallel
     * 1 MiB prompts once took a server from 335 MB to 6.8 GB (about 400 bytes/token).
     */
    public static final long ENCODE_BYTES_PER_TOKEN = 400;

    /** An estimate of the memory tokenizing a text of {@code utf8Bytes} takes: {@link #mostTokens} x {@link #ENCODE_BYTES_PER_TOKEN}. */
    public static long encodeMemoryEstimate(long utf8Bytes) {
        return mostTokens(utf8Bytes) * ENCODE_BYTES_PER_TOKEN;
    }

    /**
     * The UTF-8 length of a text, without encoding it.
     *
     * @throws IllegalArgumentException naming the index of an unpaired surrogate (the text is not Unicode)
     */
    public static long utf8Length(CharSequence text) {
        long n = 0;
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            if (c < 0x80) {
                n += 1;
            } else if (c < 0x800) {
                n += 2;
            } else if (Character.isHighSurrogate(c) && i + 1 < text.length() && Character.isLowSurrogate(text.charAt(i + 1))) {
                n += 4;
                i++;
            } else if (Character.isSurrogate(c)) {
                throw new IllegalArgumentException(String.format(java.util.Locale.ROOT,
                        "unpaired UTF-16 surrogate \\u%04x at character %d: not Unicode text", (int) c, i));
            } else {
                n += 3;
            }
        }
        return n;
    }

    /** Decodes ids to text; with {@code skipSpecialTokens} the special tokens (BOS, EOS, chat markers) are left out. */
    public String decode(long[] ids, boolean skipSpecialTokens) {
        if (ids.length == 0) {
            return "";
        }
        String text = tokenizer.decode(ids, skipSpecialTokens);
        return cleanUpSpaces ? cleanUp(text) : text;
    }

    /** The same clean-up as transformers' {@code clean_up_tokenization}. */
    private static String cleanUp(String s) {
        return s.replace(" .", ".")
                .replace(" ?", "?")
                .replace(" !", "!")
                .replace(" ,", ",")
                .replace(" ' ", "'")
                .replace(" n't", "n't")
                .replace(" 'm", "'m")
                .replace(" 's", "'s")
                .replace(" 've", "'ve")
                .replace(" 're", "'re");
    }

    /** Renders a chat with the model's template and encodes it (the template writes BOS itself). */
    public long[] encodeChat(List<ChatMessage> messages, boolean addGenerationPrompt) {
        return encode(applyChatTemplate(messages, addGenerationPrompt), false);
    }

    /** {@link #encodeChat} within {@code maxTokens}, as {@link #encode(String, boolean, int)}. */
    public long[] encodeChat(List<ChatMessage> messages, boolean addGenerationPrompt, int maxTokens) {
        return encode(applyChatTemplate(messages, addGenerationPrompt), false, maxTokens);
    }

    /** Renders a chat with the model's template, as text. */
    public String applyChatTemplate(List<ChatMessage> messages, boolean addGenerationPrompt) {
        if (chatTemplate == null) {
            throw new IllegalStateException("the model's tokenizer_config.json has no chat_template");
        }
        return chatTemplate.render(messages, addGenerationPrompt);
    }

    public Optional<ChatTemplate> chatTemplate() {
        return Optional.ofNullable(chatTemplate);
    }

    /** The ids that end generation (generation_config.json / config.json {@code eos_token_id}). */
    public List<Long> eosIds() {
        return eosIds;
    }

    public Optional<Long> bosId() {
        return Optional.ofNullable(bosId);
    }

    public Optional<String> bosToken() {
        return Optional.ofNullable(bosToken);
    }

    public Optional<String> eosToken() {
        return Optional.ofNullable(eosToken);
    }

    @Override
    public void close() {
        tokenizer.close();
    }
}
