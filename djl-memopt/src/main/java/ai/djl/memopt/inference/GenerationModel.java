package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.gguf.GgufModelFiles;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.LayerPlacement;
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

    private final Runnable weights; // frees the weights
    private final DeepSeekForCausalLM model;
    private final MlaCachedDecoder decoder;
    private final TextTokenizer tokenizer;
    private final List<Long> eosIds;
    private final ModelFiles files;

    private GenerationModel(Runnable weights, DeepSeekForCausalLM model, MlaCachedDecoder decoder, TextTokenizer tokenizer,
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
        checkDirectory(dir);
        NDManager weights = NDManager.newBaseManager(device);
        return open(dir, weights::close, () -> {
            DeepSeekForCausalLM model = ModelDirectories.loadDeepSeek(dir, weights, dtype, adapter);
            return new MlaCachedDecoder(model, device); // verifies listed files
        });
    }

    /**
     * As {@link #open(Path, Device, DataType, Path)}, with the decoder layers split over devices: each stage's weights
     * are read straight onto its device, each layer's cache lives there, and only the hidden state moves between stages
     * ({@link MlaCachedDecoder}). A one-device plan is {@link #open(Path, Device, DataType, Path)}.
     *
     * <pre>{@code
     * StagePlan plan = StagePlan.choose(dir, List.of(Device.gpu(0), Device.gpu(1)), DataType.FLOAT16, null);
     * try (GenerationModel m = GenerationModel.open(dir, plan, DataType.FLOAT16, null)) { ... }
     * }</pre>
     *
     * @param plan the stages ({@link StagePlan#choose}: by hand or by free memory)
     * @param adapter the adapter directory, or null for none
     * @throws IllegalArgumentException if the plan does not cover the model's decoder layers
     */
    public static GenerationModel open(Path dir, StagePlan plan, DataType dtype, Path adapter) throws IOException {
        Preconditions.checkNotNull(plan, "plan");
        checkDirectory(dir);
        LayerPlacement placement = plan.newPlacement();
        return open(dir, placement::close, () -> new MlaCachedDecoder(
                ModelDirectories.loadDeepSeek(dir, placement, dtype, adapter), plan, ExpertDispatch.AUTO));
    }

    /** Loads the model (its weights freed by {@code release}), then reads the side files beside it. */
    private static GenerationModel open(Path dir, Runnable release, DecoderLoader loader) throws IOException {
        TextTokenizer tokenizer = null;
        try {
            MlaCachedDecoder decoder = loader.load();
            ModelFiles files = ModelFiles.of(GgufModelFiles.directoryOf(dir));
            if (files.find("tokenizer.json").isPresent()) {
                tokenizer = TextTokenizer.fromFiles(files);
            }
            List<Long> eos = tokenizer != null ? tokenizer.eosIds() : TextTokenizer.readEosIds(files);
            return new GenerationModel(release, decoder.model(), decoder, tokenizer, List.copyOf(eos), files);
        } catch (IOException | RuntimeException e) {
            if (tokenizer != null) {
                tokenizer.close();
            }
            release.run();
            throw e;
        }
    }

    /** Loads a model and makes its decoder. */
    @FunctionalInterface
    private interface DecoderLoader {
        MlaCachedDecoder load() throws IOException;
    }

    private static void checkDirectory(Path dir) throws IOException {
        Preconditions.checkArgument(dir != null, "model directory is required");
        Path sideFiles = GgufModelFiles.directoryOf(dir); // a GGUF file's tokenizer as side files, else dir itself
        if (!Files.isDirectory(sideFiles)) {
            throw new IOException(dir + ": not a directory");
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
        weights.run();
    }
}
