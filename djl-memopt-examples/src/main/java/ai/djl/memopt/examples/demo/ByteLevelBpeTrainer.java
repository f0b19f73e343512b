package ai.djl.memopt.examples.demo;

import ai.djl.memopt.safetensors.AtomicFiles;
import com.google.common.base.Preconditions;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Trains a small byte-level BPE vocabulary (GPT-2 / DeepSeek style) on a text corpus and writes it as a Hugging Face
 * {@code tokenizer.json} that DJL's {@code HuggingFaceTokenizer} (and Python's {@code tokenizers}) load.
 *
 * <p>The demo's model is small, so a 128k-token vocabulary such as DeepSeek-V3's would make its embedding and LM head
 * most of its weights and its softmax most of its compute; a vocabulary of about a thousand byte-level tokens trained
 * on the corpus keeps the demo a few minutes long on two cores while every byte string stays encodable.
 *
 * <pre>{@code
 * ByteLevelBpeTrainer.train(texts, 1024).write(dir.resolve("tokenizer.json"));
 * }</pre>
 */
public final class ByteLevelBpeTrainer {

    /** GPT-2's pre-tokenisation pattern, which the Hugging Face ByteLevel pre-tokenizer applies. */
    private static final Pattern PRE_TOKENIZE = Pattern.compile(
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+");

    public static final String BOS = "<|begin_of_text|>";
    public static final String EOS = "<|end_of_text|>";

    private static final char[] BYTE_TO_CHAR = byteToUnicode();

    private final List<String> vocab;
    private final List<String[]> merges;

    private ByteLevelBpeTrainer(List<String> vocab, List<String[]> merges) {
        this.vocab = vocab;
        this.merges = merges;
    }

    /**
     * Learns merges until the vocabulary (2 special tokens, 256 bytes, merges) reaches {@code vocabSize}.
     *
     * @param texts the training corpus
     * @param vocabSize the vocabulary size, at least 258
     */
    public static ByteLevelBpeTrainer train(List<String> texts, int vocabSize) {
        Preconditions.checkArgument(vocabSize >= 258, "vocabSize %s is below 258 (2 special tokens + 256 bytes)",
                vocabSize);
        Map<String, Integer> wordCounts = new HashMap<>();
        for (String text : texts) {
            Matcher m = PRE_TOKENIZE.matcher(text);
            while (m.find()) {
                wordCounts.merge(toByteChars(m.group()), 1, Integer::sum);
            }
        }
        List<List<String>> words = new ArrayList<>();
        List<Integer> counts = new ArrayList<>();
        for (Map.Entry<String, Integer> e : wordCounts.entrySet()) {
            List<String> symbols = new ArrayList<>();
            for (char c : e.getKey().toCharArray()) {
                symbols.add(String.valueOf(c));
            }
            words.add(symbols);
            counts.add(e.getValue());
        }
        List<String> vocab = new ArrayList<>();
        vocab.add(BOS);
        vocab.add(EOS);
        for (char c : BYTE_TO_CHAR) {
            vocab.add(String.valueOf(c));
        }
        List<String[]> merges = new ArrayList<>();
        while (vocab.size() < vocabSize) {
            Map<String, Integer> pairCounts = new HashMap<>();
            for (int w = 0; w < words.size(); w++) {
                List<String> s = words.get(w);
                for (int i = 0; i + 1 < s.size(); i++) {
                    pairCounts.merge(s.get(i) + '\u0000' + s.get(i + 1), counts.get(w), Integer::sum);
                }
            }
            String best = null;
            int bestCount = 1;
            for (Map.Entry<String, Integer> e : pairCounts.entrySet()) {
                // ties broken by the pair's text so the vocabulary does not depend on hash order
                if (e.getValue() > bestCount || (e.getValue() == bestCount && best != null
                        && e.getKey().compareTo(best) < 0)) {
                    best = e.getKey();
                    bestCount = e.getValue();
                }
            }
            if (best == null) {
                break; // every word is a single symbol: nothing left to merge
            }
            String[] pair = best.split("\u0000", 2);
            String merged = pair[0] + pair[1];
            merges.add(pair);
            vocab.add(merged);
            for (List<String> s : words) {
                for (int i = 0; i + 1 < s.size(); i++) {
                    if (s.get(i).equals(pair[0]) && s.get(i + 1).equals(pair[1])) {
                        s.set(i, merged);
                        s.remove(i + 1);
                    }
                }
            }
        }
        return new ByteLevelBpeTrainer(List.copyOf(vocab), List.copyOf(merges));
    }

    public int vocabSize() {
        return vocab.size();
    }

    public int bosId() {
        return 0;
    }

    public int eosId() {
        return 1;
    }

    /** The {@code tokenizer.json} document. */
    public String toJson() {
        JsonObject root = new JsonObject();
        root.addProperty("version", "1.0");
        root.add("truncation", JsonNull.INSTANCE);
        root.add("padding", JsonNull.INSTANCE);
        JsonArray added = new JsonArray();
        for (int id = 0; id < 2; id++) {
            JsonObject t = new JsonObject();
            t.addProperty("id", id);
            t.addProperty("content", vocab.get(id));
            t.addProperty("single_word", false);
            t.addProperty("lstrip", false);
            t.addProperty("rstrip", false);
            t.addProperty("normalized", false);
            t.addProperty("special", true);
            added.add(t);
        }
        root.add("added_tokens", added);
        root.add("normalizer", JsonNull.INSTANCE);
        root.add("pre_tokenizer", byteLevel(true));
        root.add("post_processor", byteLevel(false));
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
        JsonObject vocabJson = new JsonObject();
        for (int i = 0; i < vocab.size(); i++) {
            vocabJson.addProperty(vocab.get(i), i);
        }
        model.add("vocab", vocabJson);
        JsonArray mergesJson = new JsonArray();
        for (String[] m : merges) {
            mergesJson.add(m[0] + " " + m[1]);
        }
        model.add("merges", mergesJson);
        root.add("model", model);
        return new GsonBuilder().disableHtmlEscaping().create().toJson(root);
    }

    /** A {@code tokenizer_config.json} naming the special tokens, as transformers writes one. */
    public String tokenizerConfigJson() {
        Map<String, Object> cfg = new LinkedHashMap<>();
        cfg.put("add_bos_token", true);
        cfg.put("add_eos_token", false);
        cfg.put("bos_token", BOS);
        cfg.put("eos_token", EOS);
        cfg.put("pad_token", EOS);
        cfg.put("model_max_length", 4096);
        cfg.put("tokenizer_class", "PreTrainedTokenizerFast");
        cfg.put("chat_template", "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}"
                + "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}");
        return new GsonBuilder().setPrettyPrinting().disableHtmlEscaping().create().toJson(cfg);
    }

    /** Writes {@code tokenizer.json} and {@code tokenizer_config.json} into {@code dir}, each atomically. */
    public void writeTo(Path dir) throws IOException {
        Files.createDirectories(dir);
        AtomicFiles.writeString(dir.resolve("tokenizer.json"), toJson());
        AtomicFiles.writeString(dir.resolve("tokenizer_config.json"), tokenizerConfigJson());
    }

    private static JsonObject byteLevel(boolean trimOffsets) {
        JsonObject o = new JsonObject();
        o.addProperty("type", "ByteLevel");
        o.addProperty("add_prefix_space", false);
        o.addProperty("trim_offsets", trimOffsets);
        o.addProperty("use_regex", true);
        return o;
    }

    private static String toByteChars(String text) {
        byte[] bytes = text.getBytes(StandardCharsets.UTF_8);
        char[] out = new char[bytes.length];
        for (int i = 0; i < bytes.length; i++) {
            out[i] = BYTE_TO_CHAR[bytes[i] & 0xff];
        }
        return new String(out);
    }

    /** GPT-2's reversible map from bytes to printable characters, which the ByteLevel pre-tokenizer uses. */
    private static char[] byteToUnicode() {
        char[] map = new char[256];
        boolean[] printable = new boolean[256];
        for (int b = '!'; b <= '~'; b++) {
            printable[b] = true;
        }
        for (int b = 0xA1; b <= 0xAC; b++) {
            printable[b] = true;
        }
        for (int b = 0xAE; b <= 0xFF; b++) {
            printable[b] = true;
        }
        int next = 0;
        for (int b = 0; b < 256; b++) {
            map[b] = printable[b] ? (char) b : (char) (256 + next++);
        }
        return map;
    }
}
