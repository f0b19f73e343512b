package ai.djl.memopt.gguf;

import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;

/**
 * The tokenizer in a GGUF file, both ways.
 *
 * <p><b>Export</b>: a byte-level BPE {@code tokenizer.json} becomes llama.cpp's {@code gpt2} tokenizer: every id's
 * token ({@code [PAD<i>]} for ids the tokenizer does not use, as llama.cpp's converter writes them), token types
 * (control for special added tokens), the merges, the pre-tokenizer name llama.cpp knows the regexes by
 * ({@code gpt-2} for the plain ByteLevel pre-tokenizer, {@code deepseek-v3} for DeepSeek-V3's split sequence), the
 * BOS/EOS ids, {@code add_bos_token} and the chat template. The original {@code tokenizer.json} is kept under
 * {@code tokenizer.huggingface.json}, which llama.cpp ignores and our import reads back. A model without a tokenizer
 * (the tiny test fixtures) can get {@code tokenizer.ggml.model = "none"}: llama.cpp then makes {@code vocab_size} dummy
 * tokens, and token ids work as usual, but front ends that tokenize at load time abort on it, so by default such a
 * model gets a placeholder byte vocabulary instead ({@link #writePlaceholder}).
 *
 * <p><b>Import</b>: {@link #materialize} writes {@code tokenizer.json}, {@code tokenizer_config.json} and
 * {@code generation_config.json} into a directory for {@code TextTokenizer.fromModelDir}: the embedded original when
 * present, else one rebuilt from the {@code gpt2} vocabulary for the pre-tokenizers above.
 */
public final class GgufTokenizer {

    static final String HF_JSON = "tokenizer.huggingface.json";
    /** The {@code pre} argument that asks for llama.cpp's no-vocabulary mode for a model without a tokenizer. */
    public static final String NONE = "none";
    static final String PLACEHOLDER = "placeholder";
    static final String PLACEHOLDER_KEY = "memopt.tokenizer";
    private static final String[] DEEPSEEK_V3_SPLITS = {
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
                + " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
    };
    private static final int NORMAL = 1;
    private static final int CONTROL = 3;
    private static final int USER_DEFINED = 4;
    private static final int UNUSED = 5;

    private GgufTokenizer() {}

    /**
     * Writes the tokenizer metadata of {@code modelDir} (or "none" when it has no {@code tokenizer.json}).
     *
     * @param pre llama.cpp's pre-tokenizer name, or null to recognise it from {@code tokenizer.json}
     * @return the pre-tokenizer name written, or "none"
     * @throws IOException for an unreadable file, a tokenizer that is not byte-level BPE, or a pre-tokenizer this
     *     exporter cannot name
     */
    static String write(GgufWriter w, Path modelDir, int vocabSize, String pre) throws IOException {
        Path file = modelDir == null ? null : modelDir.resolve("tokenizer.json");
        if (file == null || !Files.isRegularFile(file)) {
            if (NONE.equals(pre)) {
                w.put("tokenizer.ggml.model", GgufValue.string("none"));
                return NONE;
            }
            writePlaceholder(w, modelDir, vocabSize);
            return PLACEHOLDER;
        }
        String text = Files.readString(file, StandardCharsets.UTF_8);
        JsonObject root = JsonParser.parseString(text).getAsJsonObject();
        JsonObject model = root.getAsJsonObject("model");
        if (model == null || !"BPE".equals(str(model.get("type")))) {
            throw new IOException(file + ": only byte-level BPE tokenizers can be written to GGUF, model type is "
                    + (model == null ? "missing" : str(model.get("type"))));
        }
        String name = pre != null ? pre : preName(root.get("pre_tokenizer"), file);
        String[] tokens = new String[vocabSize];
        int[] types = new int[vocabSize];
        for (Map.Entry<String, JsonElement> e : model.getAsJsonObject("vocab").entrySet()) {
            put(tokens, types, e.getValue().getAsInt(), e.getKey(), NORMAL, file);
        }
        JsonArray added = root.has("added_tokens") ? root.getAsJsonArray("added_tokens") : new JsonArray();
        for (JsonElement e : added) {
            JsonObject t = e.getAsJsonObject();
            boolean special = t.has("special") && t.get("special").getAsBoolean();
            put(tokens, types, t.get("id").getAsInt(), t.get("content").getAsString(), special ? CONTROL : USER_DEFINED,
                    file);
        }
        for (int i = 0; i < vocabSize; i++) {
            if (tokens[i] == null) {
                tokens[i] = "[PAD" + i + "]";
                types[i] = UNUSED;
            }
        }
        List<String> merges = new ArrayList<>();
        for (JsonElement m : model.getAsJsonArray("merges")) {
            merges.add(m.isJsonArray() ? m.getAsJsonArray().get(0).getAsString() + " "
                    + m.getAsJsonArray().get(1).getAsString() : m.getAsString());
        }
        List<Long> typeList = new ArrayList<>();
        for (int t : types) {
            typeList.add((long) t);
        }
        w.put("tokenizer.ggml.model", GgufValue.string("gpt2"));
        w.put("tokenizer.ggml.pre", GgufValue.string(name));
        w.put("tokenizer.ggml.tokens", GgufValue.array(GgufValueType.STRING, List.of(tokens)));
        w.put("tokenizer.ggml.token_type", GgufValue.array(GgufValueType.INT32, typeList));
        w.put("tokenizer.ggml.merges", GgufValue.array(GgufValueType.STRING, merges));
        JsonObject tc = readJson(modelDir.resolve("tokenizer_config.json"));
        Map<String, Integer> ids = new HashMap<>();
        for (int i = 0; i < vocabSize; i++) {
            ids.putIfAbsent(tokens[i], i);
        }
        Integer bos = specialId(tc, "bos_token", ids, modelDir, "bos_token_id");
        Integer eos = specialId(tc, "eos_token", ids, modelDir, "eos_token_id");
        if (bos != null) {
            w.put("tokenizer.ggml.bos_token_id", GgufValue.uint32(bos));
        }
        if (eos != null) {
            w.put("tokenizer.ggml.eos_token_id", GgufValue.uint32(eos));
        }
        Integer pad = specialId(tc, "pad_token", ids, modelDir, "pad_token_id");
        if (pad != null) {
            w.put("tokenizer.ggml.padding_token_id", GgufValue.uint32(pad));
        }
        if (tc != null && tc.has("add_bos_token") && !tc.get("add_bos_token").isJsonNull()) {
            w.put("tokenizer.ggml.add_bos_token", GgufValue.bool(tc.get("add_bos_token").getAsBoolean()));
        }
        if (tc != null && tc.has("add_eos_token") && !tc.get("add_eos_token").isJsonNull()) {
            w.put("tokenizer.ggml.add_eos_token", GgufValue.bool(tc.get("add_eos_token").getAsBoolean()));
        }
        if (tc != null && tc.has("chat_template") && tc.get("chat_template").isJsonPrimitive()) {
            w.put("tokenizer.chat_template", GgufValue.string(tc.get("chat_template").getAsString()));
        }
        w.put(HF_JSON, GgufValue.string(text));
        return name;
    }

    /**
     * A vocabulary for a model that has none: ids below 256 are the byte-level tokens of bytes 0..255, the rest
     * {@code [PAD<i>]}, no merges. llama.cpp's own no-vocabulary mode ({@code "none"}) loads in llama.cpp, but
     * front ends that tokenize anything at load time (node-llama-cpp resolves its BOS text) abort on it; this loads
     * everywhere, and token ids mean what the model learned. Marked {@code memopt.tokenizer = placeholder}, which our
     * import reads as "no tokenizer".
     */
    private static void writePlaceholder(GgufWriter w, Path modelDir, int vocabSize) throws IOException {
        char[] byteChars = byteToUnicode();
        List<String> tokens = new ArrayList<>();
        List<Long> types = new ArrayList<>();
        for (int i = 0; i < vocabSize; i++) {
            tokens.add(i < 256 ? String.valueOf(byteChars[i]) : "[PAD" + i + "]");
            types.add((long) (i < 256 ? NORMAL : UNUSED));
        }
        w.put("tokenizer.ggml.model", GgufValue.string("gpt2"));
        w.put("tokenizer.ggml.pre", GgufValue.string("default"));
        w.put("tokenizer.ggml.tokens", GgufValue.array(GgufValueType.STRING, tokens));
        w.put("tokenizer.ggml.token_type", GgufValue.array(GgufValueType.INT32, types));
        w.put("tokenizer.ggml.merges", GgufValue.array(GgufValueType.STRING, List.of()));
        if (modelDir != null) {
            for (String name : new String[] {"generation_config.json", "config.json"}) {
                JsonObject o = readJson(modelDir.resolve(name));
                for (String key : new String[] {"bos_token_id", "eos_token_id"}) {
                    String gguf = "tokenizer.ggml." + key;
                    if (o != null && o.has(key) && o.get(key).isJsonPrimitive() && o.get(key).getAsInt() < vocabSize
                            && !w.has(gguf)) {
                        w.put(gguf, GgufValue.uint32(o.get(key).getAsInt()));
                    }
                }
            }
        }
        w.put(PLACEHOLDER_KEY, GgufValue.string(PLACEHOLDER));
    }

    /** GPT-2's reversible map from bytes to printable characters (the ByteLevel pre-tokenizer's alphabet). */
    private static char[] byteToUnicode() {
        char[] map = new char[256];
        int next = 0;
        for (int b = 0; b < 256; b++) {
            boolean printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            map[b] = printable ? (char) b : (char) (256 + next++);
        }
        return map;
    }

    private static void put(String[] tokens, int[] types, int id, String token, int type, Path file)
            throws IOException {
        if (id < 0 || id >= tokens.length) {
            throw new IOException(file + ": token '" + token + "' has id " + id + ", outside the model's vocabulary of "
                    + tokens.length);
        }
        tokens[id] = token;
        types[id] = type;
    }

    /** llama.cpp's name for a tokenizer.json pre-tokenizer. */
    static String preName(JsonElement pre, Path file) throws IOException {
        if (pre != null && pre.isJsonObject()) {
            JsonObject p = pre.getAsJsonObject();
            String type = str(p.get("type"));
            if ("ByteLevel".equals(type) && bool(p.get("use_regex"), true) && !bool(p.get("add_prefix_space"), false)) {
                return "gpt-2";
            }
            if ("Sequence".equals(type)) {
                JsonArray list = p.getAsJsonArray("pretokenizers");
                if (list.size() == DEEPSEEK_V3_SPLITS.length + 1) {
                    boolean same = true;
                    for (int i = 0; i < DEEPSEEK_V3_SPLITS.length; i++) {
                        JsonObject s = list.get(i).getAsJsonObject();
                        JsonObject pattern = s.getAsJsonObject("pattern");
                        same &= "Split".equals(str(s.get("type"))) && pattern != null
                                && DEEPSEEK_V3_SPLITS[i].equals(str(pattern.get("Regex")));
                    }
                    JsonObject last = list.get(DEEPSEEK_V3_SPLITS.length).getAsJsonObject();
                    if (same && "ByteLevel".equals(str(last.get("type"))) && !bool(last.get("use_regex"), true)) {
                        return "deepseek-v3";
                    }
                }
            }
        }
        throw new IOException(file + ": pre-tokenizer " + pre + " is not one this exporter can name for llama.cpp"
                + " (plain ByteLevel = gpt-2, DeepSeek-V3's split sequence = deepseek-v3); name it with --tokenizer-pre");
    }

    private static Integer specialId(JsonObject tc, String field, Map<String, Integer> ids, Path dir, String idField)
            throws IOException {
        if (tc != null && tc.has(field) && !tc.get(field).isJsonNull()) {
            JsonElement e = tc.get(field);
            String text = e.isJsonObject() ? str(e.getAsJsonObject().get("content")) : str(e);
            Integer id = ids.get(text);
            if (id == null) {
                throw new IOException(dir.resolve("tokenizer_config.json") + ": " + field + " '" + text
                        + "' is not a token of tokenizer.json");
            }
            return id;
        }
        for (String name : new String[] {"generation_config.json", "config.json"}) {
            JsonObject o = readJson(dir.resolve(name));
            if (o != null && o.has(idField) && o.get(idField).isJsonPrimitive()) {
                return o.get(idField).getAsInt();
            }
        }
        return null;
    }

    /**
     * Writes {@code tokenizer.json}, {@code tokenizer_config.json} and {@code generation_config.json} of a GGUF
     * file's tokenizer into {@code dir}.
     *
     * @return false when the file has no text tokenizer ({@code "none"}) to write
     * @throws GgufFormatException for a tokenizer that cannot be rebuilt (naming the key)
     */
    public static boolean materialize(GgufFile f, Path dir) throws IOException {
        String model = f.string("tokenizer.ggml.model").orElse("none");
        if ("none".equals(model) || "no_vocab".equals(model)
                || PLACEHOLDER.equals(f.string(PLACEHOLDER_KEY).orElse(null))) {
            Optional<GgufValue> eos = f.get("tokenizer.ggml.eos_token_id");
            if (eos.isPresent()) { // the EOS id still ends generation by token ids
                JsonObject gc = new JsonObject();
                gc.addProperty("eos_token_id", eos.get().asLong());
                Files.writeString(dir.resolve("generation_config.json"), gc.toString(), StandardCharsets.UTF_8);
            }
            return false;
        }
        if (!"gpt2".equals(model)) {
            throw new GgufFormatException(f.path() + ": tokenizer.ggml.model '" + model
                    + "' is not supported for text (only gpt2, byte-level BPE); use token ids");
        }
        List<?> tokens = array(f, "tokenizer.ggml.tokens");
        String json = f.string(HF_JSON).orElse(null);
        if (json == null) {
            json = rebuild(f, tokens);
        }
        Files.writeString(dir.resolve("tokenizer.json"), json, StandardCharsets.UTF_8);
        JsonObject tc = new JsonObject();
        Optional<GgufValue> bos = f.get("tokenizer.ggml.bos_token_id");
        Optional<GgufValue> eos = f.get("tokenizer.ggml.eos_token_id");
        if (bos.isPresent()) {
            tc.addProperty("bos_token", token(f, tokens, bos.get(), "bos"));
        }
        if (eos.isPresent()) {
            tc.addProperty("eos_token", token(f, tokens, eos.get(), "eos"));
        }
        tc.addProperty("add_bos_token", f.get("tokenizer.ggml.add_bos_token").map(GgufValue::asBool).orElse(false));
        tc.addProperty("add_eos_token", f.get("tokenizer.ggml.add_eos_token").map(GgufValue::asBool).orElse(false));
        Optional<String> template = f.string("tokenizer.chat_template");
        template.ifPresent(t -> tc.addProperty("chat_template", t));
        Files.writeString(dir.resolve("tokenizer_config.json"), tc.toString(), StandardCharsets.UTF_8);
        if (eos.isPresent()) {
            JsonObject gc = new JsonObject();
            gc.addProperty("eos_token_id", eos.get().asLong());
            bos.ifPresent(b -> gc.addProperty("bos_token_id", b.asLong()));
            Files.writeString(dir.resolve("generation_config.json"), gc.toString(), StandardCharsets.UTF_8);
        }
        return true;
    }

    private static String token(GgufFile f, List<?> tokens, GgufValue id, String what) throws GgufFormatException {
        long i = id.asLong();
        if (i < 0 || i >= tokens.size()) {
            throw new GgufFormatException(f.path() + ": tokenizer.ggml." + what + "_token_id " + i
                    + " is outside the " + tokens.size() + " tokens");
        }
        return (String) tokens.get((int) i);
    }

    private static String rebuild(GgufFile f, List<?> tokens) throws GgufFormatException {
        String pre = f.string("tokenizer.ggml.pre").orElse("default");
        JsonObject root = new JsonObject();
        root.addProperty("version", "1.0");
        root.add("truncation", JsonNull.INSTANCE);
        root.add("padding", JsonNull.INSTANCE);
        List<?> types = f.get("tokenizer.ggml.token_type").isPresent() ? array(f, "tokenizer.ggml.token_type") : null;
        JsonArray added = new JsonArray();
        JsonObject vocab = new JsonObject();
        for (int i = 0; i < tokens.size(); i++) {
            long type = types == null ? NORMAL : (Long) types.get(i);
            String t = (String) tokens.get(i);
            if (type == CONTROL || type == USER_DEFINED) {
                JsonObject a = new JsonObject();
                a.addProperty("id", i);
                a.addProperty("content", t);
                a.addProperty("single_word", false);
                a.addProperty("lstrip", false);
                a.addProperty("rstrip", false);
                a.addProperty("normalized", type == USER_DEFINED);
                a.addProperty("special", type == CONTROL);
                added.add(a);
            }
            vocab.addProperty(t, i);
        }
        root.add("added_tokens", added);
        root.add("normalizer", JsonNull.INSTANCE);
        if ("gpt-2".equals(pre)) {
            root.add("pre_tokenizer", byteLevel(true));
        } else if ("deepseek-v3".equals(pre)) {
            JsonObject seq = new JsonObject();
            seq.addProperty("type", "Sequence");
            JsonArray list = new JsonArray();
            for (String regex : DEEPSEEK_V3_SPLITS) {
                JsonObject s = new JsonObject();
                s.addProperty("type", "Split");
                JsonObject pattern = new JsonObject();
                pattern.addProperty("Regex", regex);
                s.add("pattern", pattern);
                s.addProperty("behavior", "Isolated");
                s.addProperty("invert", false);
                list.add(s);
            }
            list.add(byteLevel(false));
            seq.add("pretokenizers", list);
            root.add("pre_tokenizer", seq);
        } else {
            throw new GgufFormatException(f.path() + ": tokenizer.ggml.pre '" + pre + "' cannot be rebuilt as a"
                    + " Hugging Face tokenizer (gpt-2 or deepseek-v3); use token ids");
        }
        root.add("post_processor", JsonNull.INSTANCE);
        root.add("decoder", byteLevel(true));
        JsonObject model = new JsonObject();
        model.addProperty("type", "BPE");
        model.add("dropout", JsonNull.INSTANCE);
        model.add("unk_token", JsonNull.INSTANCE);
        model.add("continuing_subword_prefix", JsonNull.INSTANCE);
        model.add("end_of_word_suffix", JsonNull.INSTANCE);
        model.addProperty("fuse_unk", false);
        model.addProperty("byte_fallback", false);
        model.addProperty("ignore_merges", false);
        model.add("vocab", vocab);
        JsonArray merges = new JsonArray();
        for (Object m : array(f, "tokenizer.ggml.merges")) {
            merges.add((String) m);
        }
        model.add("merges", merges);
        root.add("model", model);
        return new GsonBuilder().disableHtmlEscaping().create().toJson(root);
    }

    private static JsonObject byteLevel(boolean useRegex) {
        JsonObject o = new JsonObject();
        o.addProperty("type", "ByteLevel");
        o.addProperty("add_prefix_space", false);
        o.addProperty("trim_offsets", true);
        o.addProperty("use_regex", useRegex);
        return o;
    }

    private static List<?> array(GgufFile f, String key) throws GgufFormatException {
        GgufValue v = f.get(key).orElseThrow(() -> new GgufFormatException(f.path() + ": missing metadata '" + key
                + "'"));
        if (v.type() != GgufValueType.ARRAY) {
            throw new GgufFormatException(f.path() + ": metadata '" + key + "' is " + v.type() + ", expected an array");
        }
        return v.asList();
    }

    private static JsonObject readJson(Path file) throws IOException {
        if (!Files.isRegularFile(file)) {
            return null;
        }
        return JsonParser.parseString(Files.readString(file, StandardCharsets.UTF_8)).getAsJsonObject();
    }

    private static String str(JsonElement e) {
        return e == null || e.isJsonNull() ? null : e.getAsString();
    }

    private static boolean bool(JsonElement e, boolean def) {
        return e == null || e.isJsonNull() ? def : e.getAsBoolean();
    }
}
