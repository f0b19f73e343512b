package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.gguf.GgufModelFiles;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.common.base.Preconditions;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Optional;
import java.util.Set;

/**
 * A DeepSeek checkpoint directory opened for generation: the model ({@link DeepSeekLoader}), the compressed-cache
 * decoder, the tokenizer when the directory has a {@code tokenizer.json}, and the EOS ids of
 * {@code generation_config.json}/{@code config.json}. Of a quantized artifact only the files its manifest lists (and
 * loading has checksummed) are read: a tokenizer or generation config dropped in later is refused ({@link ModelFiles}).
 * Closing it frees the weights.
 *
 * <pre>{@code
 * try (GenerationModel m = GenerationModel.open(dir, Device.cpu(), DataType.FLOAT32)) {
 *     GenerationResult r = m.generator().generate(m.tokenizer().orElseThrow().encode("Hi"), SamplingParams.greedy(32));
 * }
 * }</pre>
 */
public final class GenerationModel implements AutoCloseable {

    private final NDManager weights;
    private final DeepSeekForCausalLM model;
    private final MlaCachedDecoder decoder;
    private final TextTokenizer tokenizer;
    private final List<Long> eosIds;
    private final ModelFiles files;

    private GenerationModel(NDManager weights, DeepSeekForCausalLM model, MlaCachedDecoder decoder, TextTokenizer tokenizer,
            List<Long> eosIds, ModelFiles files) {
        this.files = files;
        this.weights = weights;
        this.model = model;
        this.decoder = decoder;
        this.tokenizer = tokenizer;
        this.eosIds = eosIds;
    }

    /**
     * Opens a Hugging Face DeepSeek-V2/V3 directory, a quantized artifact of one, or a GGUF file.
     *
     * @param dtype {@link DataType#FLOAT32} or {@link DataType#FLOAT16} (BF16 checkpoints are converted on load)
     * @throws IOException if the directory, config, weights or tokenizer files are missing or malformed
     */
    public static GenerationModel open(Path dir, Device device, DataType dtype) throws IOException {
        return open(dir, device, dtype, null);
    }

    /**
     * As {@link #open(Path, Device, DataType)}, with a LoRA adapter (PEFT layout) put on the model first, unmerged.
     *
     * @param adapter the adapter directory, or null for none
     */
    public static GenerationModel open(Path dir, Device device, DataType dtype, Path adapter) throws IOException {
        Preconditions.checkArgument(dir != null, "model directory is required");
        Path sideFiles = GgufModelFiles.directoryOf(dir); // a GGUF file's tokenizer as side files, else dir itself
        if (!Files.isDirectory(sideFiles)) {
            throw new IOException(dir + ": not a directory");
        }
        NDManager weights = NDManager.newBaseManager(device);
        TextTokenizer tokenizer = null;
        try {
            DeepSeekForCausalLM model = ModelDirectories.loadDeepSeek(dir, weights, dtype, adapter); // verifies listed files
            ModelFiles files = ModelFiles.of(sideFiles);
            if (files.find("tokenizer.json").isPresent()) {
                tokenizer = TextTokenizer.fromFiles(files);
            }
            List<Long> eos = tokenizer != null ? tokenizer.eosIds() : TextTokenizer.readEosIds(files);
            return new GenerationModel(weights, model, new MlaCachedDecoder(model, device), tokenizer, List.copyOf(eos), files);
        } catch (IOException | RuntimeException e) {
            if (tokenizer != null) {
                tokenizer.close();
            }
            weights.close();
            throw e;
        }
    }

    public DeepSeekConfig config() {
        return model.config();
    }

    public DeepSeekForCausalLM model() {
        return model;
    }

    public MlaCachedDecoder decoder() {
        return decoder;
    }

    public Optional<TextTokenizer> tokenizer() {
        return Optional.ofNullable(tokenizer);
    }

    /** The files of the directory that were read (for an artifact, those its manifest lists). */
    public ModelFiles files() {
        return files;
    }

    /** The ids that end generation by default. */
    public List<Long> eosIds() {
        return eosIds;
    }

    /** A generator over the cached decoder, with {@link #eosIds()} as the default EOS ids. */
    public Generator generator() {
        return new Generator(decoder, tokenizer, eosIds);
    }

    @Override
    public void close() {
        if (tokenizer != null) {
            tokenizer.close();
        }
        weights.close();
    }
}
