package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.inference.ModelFiles;
import ai.djl.memopt.gguf.GgufFile;
import ai.djl.memopt.gguf.GgufModelFiles;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.Callable;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;

/**
 * {@code memopt perplexity}: mean next-token cross-entropy (nats) and perplexity of a model on token ids or a text file,
 * printed as one JSON line. Long inputs are cut into consecutive windows of {@code --seq} tokens (at most the model's
 * context, {@code max_position_embeddings}); the loss is averaged over every predicted token of every window. A bar on
 * stderr shows the windows done ({@code --no-progress} turns it off). {@code --text} needs the model's
 * {@code tokenizer.json}; of a quantized artifact only one its manifest lists.
 *
 * <pre>
 * memopt perplexity --model DIR --token-ids 5,17,3,9
 * memopt perplexity --model DIR --text speech.txt --seq 512
 * </pre>
 */
@Command(name = "perplexity", mixinStandardHelpOptions = true,
        description = "Mean next-token cross-entropy and perplexity of a model on token ids or a text file.")
public final class PerplexityCommand implements Callable<Integer> {

    @Option(names = "--model", required = true, paramLabel = "DIR",
            description = "Model directory: a Hugging Face checkpoint (config.json, safetensors) or a quantized artifact; tokenizer.json for --text.")
    Path model;

    @Option(names = "--adapter", paramLabel = "DIR",
            description = "A LoRA adapter (PEFT layout, as memopt finetune --lora-rank writes it) to run on the"
                    + " model, unmerged; on a quantized artifact the base stays quantized.")
    Path adapter;

    @Option(names = "--token-ids", paramLabel = "IDS", description = "Comma-separated token ids, e.g. 5,17,3.")
    String tokenIds;

    @Option(names = "--text", paramLabel = "FILE", description = "UTF-8 text file, tokenized with DIR/tokenizer.json.")
    Path text;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "Device (default cpu).")
    String device;

    @Option(names = "--seq", paramLabel = "N",
            description = "Window length in tokens, at most max_position_embeddings (default: min(max_position_embeddings, 1024)).")
    Integer seq;

    @Option(names = "--dtype", defaultValue = "fp32", paramLabel = "fp32|fp16",
            description = "Weight type (default fp32).")
    String dtype;

    @Option(names = "--json", description = "Accepted for consistency with the other commands: the result is always "
            + "one JSON line.")
    boolean json;

    @Option(names = "--no-progress", description = "No progress bar on stderr.")
    boolean noProgress;

    @Override
    public Integer call() throws Exception {
        if ((tokenIds == null) == (text == null)) {
            throw new IllegalArgumentException("give exactly one of --token-ids or --text");
        }
        if (!Files.isDirectory(model) && !GgufFile.isGguf(model)) {
            throw new IllegalArgumentException("model directory " + model + " does not exist");
        }
        Device dev = Devices.parse(device);
        DataType type = Devices.dtype(dtype);
        long[] ids = tokenIds != null ? parseIds(tokenIds) : tokenize(model, text);
        try (Scorer scorer = openModel(model, dev, type, adapter)) {
            int window = seq != null ? seq : Math.min(scorer.maxPositions(), 1024);
            if (window < 2) {
                throw new IllegalArgumentException("--seq must be at least 2, got " + window);
            }
            if (window > scorer.maxPositions()) {
                throw new IllegalArgumentException("--seq " + window + " exceeds the model's context of "
                        + scorer.maxPositions() + " tokens (max_position_embeddings in " + model.resolve("config.json") + ")");
            }
            for (long id : ids) {
                if (id < 0 || id >= scorer.vocabSize()) {
                    throw new IllegalArgumentException(
                            "token id " + id + " is outside the model's vocabulary [0, " + scorer.vocabSize() + ")");
                }
            }
            if (ids.length < 2) {
                throw new IllegalArgumentException("need at least 2 tokens to predict one, got " + ids.length);
            }
            int total = windows(ids.length, window);
            ProgressBar bar = noProgress ? null : new ProgressBar(System.err, "perplexity", total);
            Evaluation e = evaluate(scorer, ids, window, bar == null ? null
                    : (done, running) -> bar.update(done, String.format(Locale.ROOT, "windows, loss %.4f", running.loss())));
            if (bar != null) {
                bar.finish();
            }
            double loss = e.loss();
            JsonObject out = new JsonObject();
            out.addProperty("model", model.toString());
            out.addProperty("tokens", ids.length);
            out.addProperty("predicted", e.predicted());
            out.addProperty("windows", e.windows());
            out.addProperty("seq", window);
            out.addProperty("loss", loss);
            out.addProperty("perplexity", Math.exp(loss));
            out.addProperty("device", dev.isGpu() ? "gpu" + dev.getDeviceId() : "cpu");
            out.addProperty("dtype", type.toString().toLowerCase(Locale.ROOT));
            System.out.println(out);
        }
        return 0;
    }

    /** Something that scores token windows; what {@link #openModel} returns. */
    public interface Scorer extends AutoCloseable {
        /** Summed next-token NLL of one window of ids and the number of tokens predicted. */
        CausalLmLoss.Sum score(long[] ids);

        int vocabSize();

        int maxPositions();

        @Override
        void close();
    }

    /**
     * Opens a model directory for scoring. The one place that decides how a directory is loaded: other directory kinds
     * (quantized, adapters) plug in here.
     */
    static Scorer openModel(Path dir, Device device, DataType dtype, Path adapter) throws IOException {
        NDManager weights = NDManager.newBaseManager(device);
        try {
            return scorerOf(ModelDirectories.loadDeepSeek(dir, weights, dtype, adapter), weights::close);
        } catch (IOException | RuntimeException e) {
            weights.close();
            throw e;
        }
    }

    /** Scores with an already loaded model; {@code onClose} runs when the scorer is closed. */
    public static Scorer scorerOf(DeepSeekForCausalLM lm, Runnable onClose) {
        return new Scorer() {
            @Override
            public CausalLmLoss.Sum score(long[] ids) {
                try (NDManager m = lm.manager().newSubManager()) {
                    NDArray input = m.create(ids, new Shape(1, ids.length));
                    NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(input), false).head();
                    return CausalLmLoss.sum(logits, input, null);
                }
            }

            @Override
            public int vocabSize() {
                return lm.config().vocabSize();
            }

            @Override
            public int maxPositions() {
                return lm.config().maxPositionEmbeddings();
            }

            @Override
            public void close() {
                onClose.run();
            }
        };
    }

    /** Mean next-token loss of a token stream scored in consecutive windows of {@code window} tokens. */
    public record Evaluation(double nll, long predicted, int windows) {
        public double loss() {
            return nll / predicted;
        }

        public double perplexity() {
            return Math.exp(loss());
        }
    }

    /** Scores {@code ids} in consecutive windows (a lone trailing token predicts nothing and is dropped). */
    public static Evaluation evaluate(Scorer scorer, long[] ids, int window) {
        return evaluate(scorer, ids, window, null);
    }

    /** Called after each window with the number done and the evaluation so far. */
    public interface Progress {
        void windowDone(int done, Evaluation soFar);
    }

    /** The windows {@link #evaluate} scores for {@code tokens} tokens. */
    static int windows(int tokens, int window) {
        int full = tokens / window;
        return full + (tokens - full * window >= 2 ? 1 : 0);
    }

    /**
     * {@link #evaluate(Scorer, long[], int)}, reporting each window to {@code progress} (may be null).
     *
     * @throws IllegalArgumentException if the window is longer than the model's context
     */
    public static Evaluation evaluate(Scorer scorer, long[] ids, int window, Progress progress) {
        if (window > scorer.maxPositions()) {
            throw new IllegalArgumentException("a window of " + window + " tokens exceeds the model's context of "
                    + scorer.maxPositions() + " tokens (max_position_embeddings)");
        }
        double nll = 0;
        long predicted = 0;
        int windows = 0;
        for (int start = 0; start < ids.length; start += window) {
            int end = Math.min(ids.length, start + window);
            if (end - start < 2) {
                break;
            }
            CausalLmLoss.Sum s = scorer.score(java.util.Arrays.copyOfRange(ids, start, end));
            nll += s.nll();
            predicted += s.tokens();
            windows++;
            if (progress != null) {
                progress.windowDone(windows, new Evaluation(nll, predicted, windows));
            }
        }
        return new Evaluation(nll, predicted, windows);
    }

    static long[] parseIds(String csv) {
        String[] parts = csv.split(",");
        long[] ids = new long[parts.length];
        for (int i = 0; i < parts.length; i++) {
            String p = parts[i].trim();
            try {
                ids[i] = Long.parseLong(p);
            } catch (NumberFormatException e) {
                throw new IllegalArgumentException("bad --token-ids: '" + p + "' (item " + (i + 1)
                        + ") is not an integer");
            }
        }
        return ids;
    }

    public static long[] tokenize(Path modelDir, Path textFile) throws IOException {
        if (!Files.isRegularFile(textFile)) {
            throw new IllegalArgumentException("text file " + textFile + " does not exist");
        }
        ModelFiles files = ModelFiles.of(GgufModelFiles.directoryOf(modelDir)); // of an artifact, only what its manifest lists
        Path tokenizerJson = files.find("tokenizer.json").orElseThrow(
                () -> new IllegalArgumentException(files.absence("tokenizer.json") + " (needed for --text)"));
        String content = Files.readString(textFile, StandardCharsets.UTF_8);
        Map<String, String> options = new HashMap<>();
        options.put("truncation", "false"); // windows are cut here, not by the tokenizer
        options.put("padding", "false");
        try (HuggingFaceTokenizer tokenizer = HuggingFaceTokenizer.newInstance(tokenizerJson, options)) {
            return tokenizer.encode(content).getIds();
        }
    }
}
