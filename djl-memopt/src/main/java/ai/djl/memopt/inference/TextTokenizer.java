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
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Optional;

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

    private TextTokenizer(
            HuggingFaceTokenizer tokenizer,
            Boolean addBos,
            boolean addEos,
            String bosToken,
            String eosToken,
            Long bosId,
            List<Long> eosIds,
            ChatTemplate chatTemplate,
            boolean cleanUpSpaces) {
        this.tokenizer = tokenizer;
        this.addBos = addBos;
        this.addEos = addEos;
        this.bosToken = bosToken;
        this.eosToken = eosToken;
        this.bosId = bosId;
        this.eosIds = eosIds;
        this.chatTemplate = chatTemplate;
        this.cleanUpSpaces = cleanUpSpaces;
    }

    /**
     * Loads {@code tokenizer.json} and the optional configs of a Hugging Face model directory.
     *
     * @throws IOException if {@code tokenizer.json} is missing or a config file is unreadable or malformed
     */
    public static TextTokenizer fromModelDir(Path modelDir) throws IOException {
        Path json = modelDir.resolve("tokenizer.json");
        if (!Files.isRegularFile(json)) {
            throw new NoSuchFileException(json.toString(), null, "no tokenizer.json in the model directory");
        }
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
            JsonObject tc = readJson(modelDir.resolve("tokenizer_config.json"));
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
                template = separateChatTemplate(modelDir, bos, eos);
            }
            Long bosId = bos == null ? null : singleId(hf, bos, "bos_token");
            List<Long> eosIds = readEosIds(modelDir);
            if (eosIds.isEmpty() && eos != null) {
                eosIds = List.of(singleId(hf, eos, "eos_token"));
            }
            if (Boolean.TRUE.equals(addBos) && bosId == null) {
                throw new IOException(modelDir.resolve("tokenizer_config.json") + ": add_bos_token is true but there is no bos_token");
            }
            return new TextTokenizer(hf, addBos, addEos, bos, eos, bosId, ImmutableList.copyOf(eosIds), template, cleanUp);
        } catch (IOException | RuntimeException e) {
            hf.close();
            throw e;
        }
    }

    /** Newer transformers save the template beside the config: {@code chat_template.jinja}, or {@code chat_template.json}. */
    private static ChatTemplate separateChatTemplate(Path modelDir, String bos, String eos) throws IOException {
        Path jinja = modelDir.resolve("chat_template.jinja");
        if (Files.isRegularFile(jinja)) {
            return ChatTemplate.of(Files.readString(jinja, StandardCharsets.UTF_8), bos, eos);
        }
        JsonObject o = readJson(modelDir.resolve("chat_template.json"));
        if (o != null && o.has("chat_template") && o.get("chat_template").isJsonPrimitive()) {
            return ChatTemplate.of(o.get("chat_template").getAsString(), bos, eos);
        }
        return null;
    }

    private static JsonObject readJson(Path file) throws IOException {
        if (!Files.isRegularFile(file)) {
            return null;
        }
        try {
            JsonElement e = JsonParser.parseString(Files.readString(file, StandardCharsets.UTF_8));
            if (!e.isJsonObject()) {
                throw new IOException(file + ": expected a JSON object");
            }
            return e.getAsJsonObject();
        } catch (JsonParseException e) {
            throw new IOException(file + ": malformed JSON: " + e.getMessage(), e);
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
     *
     * @throws IOException if a file is unreadable or the field malformed
     */
    public static List<Long> readEosIds(Path modelDir) throws IOException {
        for (String name : new String[] {"generation_config.json", "config.json"}) {
            Path file = modelDir.resolve(name);
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
                throw new IOException(file + ": eos_token_id must be an integer or a list of integers, got " + e, ex);
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
