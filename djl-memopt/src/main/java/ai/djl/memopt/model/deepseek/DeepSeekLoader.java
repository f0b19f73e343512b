package ai.djl.memopt.model.deepseek;

import ai.djl.Device;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.NameLists;
import ai.djl.memopt.safetensors.RegularFiles;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Parameter;
import ai.djl.training.initializer.Initializer;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.function.Predicate;
import java.util.regex.Pattern;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Loads a Hugging Face DeepSeek-V3/V2 model directory ({@code config.json} + {@code model.safetensors} or a sharded
 * index) into a {@link DeepSeekForCausalLM}, tensor by tensor, each converted to the requested type (BF16 checkpoint
 * tensors are converted in Java by the safetensors reader).
 *
 * <p>Every checkpoint tensor must match a model parameter by name and shape and every parameter must be present; the
 * multi-token-prediction layers {@code model.layers.<num_hidden_layers>+.*} are skipped (logged once), as is
 * {@code lm_head.weight} when the embeddings are tied. Errors name the file and tensor.
 *
 * <pre>{@code
 * try (NDManager manager = NDManager.newBaseManager()) {
 *     DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, manager, DataType.FLOAT32);
 * }
 * // or, owning its manager:
 * try (DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, Device.cpu(), DataType.FLOAT16)) {
 *     NDArray ids = lm.manager().create(...);
 * }
 * }</pre>
 */
public final class DeepSeekLoader {

    private static final Logger LOG = LoggerFactory.getLogger(DeepSeekLoader.class);
    private static final Pattern LAYER = Pattern.compile("^model\\.layers\\.(\\d+)\\..*");

    private DeepSeekLoader() {}

    /**
     * Loads into a new manager on {@code device} that the returned model owns ({@link DeepSeekForCausalLM#close()} frees
     * the weights).
     *
     * @param dtype {@link DataType#FLOAT32} or {@link DataType#FLOAT16}
     * @throws IllegalArgumentException for BF16 (or another type), an invalid config, a missing, unexpected, wrongly
     *     shaped or integer-typed tensor (naming file and tensor), or a quantized artifact (naming what to load it with)
     * @throws IOException if the files cannot be read or are corrupt
     */
    public static DeepSeekForCausalLM load(Path dir, Device device, DataType dtype) throws IOException {
        DeepSeekForCausalLM.checkDType(dtype);
        NDManager manager = NDManager.newBaseManager(device);
        try {
            DeepSeekForCausalLM lm = load(dir, manager, dtype);
            lm.ownManager();
            return lm;
        } catch (IOException | RuntimeException e) {
            manager.close();
            throw e;
        }
    }

    /**
     * Loads with weights allocated on {@code manager} (the caller owns it).
     *
     * @see #load(Path, Device, DataType)
     */
    public static DeepSeekForCausalLM load(Path dir, NDManager manager, DataType dtype) throws IOException {
        DeepSeekForCausalLM.checkDType(dtype);
        DeepSeekConfig config = readConfig(dir);
        try (HfCheckpoint ckpt = HfCheckpoint.open(dir)) {
            return load(config, ckpt, manager, dtype);
        }
    }

    /**
     * Loads with each weight allocated on its stage's manager of {@code placement} (decoder layers split over devices);
     * the caller owns the placement, or hands it to the model with {@link DeepSeekForCausalLM#ownManager()}.
     *
     * @see #load(Path, Device, DataType)
     */
    public static DeepSeekForCausalLM load(Path dir, LayerPlacement placement, DataType dtype) throws IOException {
        DeepSeekForCausalLM.checkDType(dtype);
        DeepSeekConfig config = readConfig(dir);
        try (HfCheckpoint ckpt = HfCheckpoint.open(dir)) {
            return load(config, ckpt, placement, dtype, name -> false);
        }
    }

    /**
     * The {@code config.json} of a model directory.
     *
     * @throws IOException if {@code dir} is not a directory, or its config.json is missing or not a regular file
     * @throws IllegalArgumentException if the config is invalid
     */
    public static DeepSeekConfig readConfig(Path dir) throws IOException {
        if (!Files.isDirectory(dir)) {
            throw new IOException(dir + ": not a directory");
        }
        Path configFile = dir.resolve("config.json");
        if (!Files.exists(configFile)) {
            throw new IOException(dir + ": no config.json");
        }
        RegularFiles.require(configFile, "config.json");
        return DeepSeekConfig.fromJson(configFile);
    }

    /** Loads an already opened checkpoint for a given config. */
    public static DeepSeekForCausalLM load(DeepSeekConfig config, HfCheckpoint ckpt, NDManager manager, DataType dtype)
            throws IOException {
        return load(config, ckpt, manager, dtype, name -> false);
    }

    /**
     * Loads an already opened checkpoint, except that the tensors named by {@code placeholders} are not read: after
     * the same checks (present, shape), their parameters get 1-element placeholders, for a caller that replaces those
     * layers itself (the streaming quantized loader reads and quantizes them one at a time).
     */
    public static DeepSeekForCausalLM load(DeepSeekConfig config, HfCheckpoint ckpt, NDManager manager, DataType dtype,
            Predicate<String> placeholders) throws IOException {
        return load(config, ckpt, LayerPlacement.single(manager), dtype, placeholders);
    }

    /** As {@link #load(DeepSeekConfig, HfCheckpoint, NDManager, DataType, Predicate)}, each weight on its stage. */
    public static DeepSeekForCausalLM load(DeepSeekConfig config, HfCheckpoint ckpt, LayerPlacement placement,
            DataType dtype, Predicate<String> placeholders) throws IOException {
        DeepSeekForCausalLM.checkDType(dtype);
        checkNotAnArtifact(ckpt);
        DeepSeekForCausalLM lm = new DeepSeekForCausalLM(config);
        Map<String, Parameter> params = BlockTrees.parameters(lm);

        List<String> skippedMtp = new ArrayList<>();
        Set<String> unexpected = new TreeSet<>();
        for (String name : ckpt.names()) {
            if (params.containsKey(name)) {
                continue;
            }
            java.util.regex.Matcher m = LAYER.matcher(name);
            if (m.matches() && Long.parseLong(m.group(1)) >= config.numHiddenLayers()) {
                skippedMtp.add(name);
            } else if (config.tieWordEmbeddings() && "lm_head.weight".equals(name)) {
                LOG.info("{}: tie_word_embeddings is true; ignoring lm_head.weight", ckpt.directory());
            } else {
                unexpected.add(name);
            }
        }
        if (!unexpected.isEmpty()) {
            String first = unexpected.iterator().next();
            throw new IllegalArgumentException(where(ckpt, first) + ": unexpected tensor '" + first
                    + "' (no such parameter in a " + config.modelType() + " model of this config)"
                    + (unexpected.size() > 1 ? "; " + unexpected.size() + " unexpected in all: "
                            + NameLists.abbreviate(unexpected) : ""));
        }
        Set<String> missing = new TreeSet<>();
        for (String name : params.keySet()) {
            if (!ckpt.contains(name)) {
                missing.add(name);
            }
        }
        if (!missing.isEmpty()) {
            List<String> files = new ArrayList<>();
            ckpt.files().forEach(f -> files.add(f.getFileName().toString()));
            throw new IllegalArgumentException(ckpt.directory() + ": missing tensor '" + missing.iterator().next()
                    + "' in " + NameLists.abbreviate(files) + (missing.size() > 1 ? " (" + missing.size()
                            + " missing: " + NameLists.abbreviate(missing) + ")" : ""));
        }
        for (String name : params.keySet()) {
            TensorInfo info = ckpt.info(name);
            if (!info.dtype().isFloating()) {
                throw new IllegalArgumentException(where(ckpt, name) + ": tensor '" + name + "' is " + info.dtype()
                        + ", but the model expects a floating-point weight (F32, F16, BF16 or F64): refusing to read"
                        + " integers as weights");
            }
        }
        if (!skippedMtp.isEmpty()) {
            LOG.info("{}: skipping {} multi-token-prediction tensors (model.layers.{}.* and later)",
                    ckpt.directory(), skippedMtp.size(), config.numHiddenLayers());
        }
        try {
            lm.initializeWith(placement, dtype, name -> new FromCheckpoint(ckpt, name, placeholders.test(name)));
        } catch (UncheckedIOException e) {
            lm.getParameters().forEach(p -> p.getValue().close());
            throw e.getCause();
        } catch (RuntimeException e) {
            lm.getParameters().forEach(p -> p.getValue().close());
            throw e;
        }
        return lm;
    }

    /**
     * A quantized artifact's weights are no Hugging Face checkpoint: say so rather than list its {@code qweight} tensors
     * as unexpected (the loader cannot import the export package, so the format name is spelled out here).
     */
    private static void checkNotAnArtifact(HfCheckpoint ckpt) {
        if (!ckpt.quantizationMetadata().filter("djl-memopt-quantized"::equals).isPresent()) {
            return;
        }
        Path dir = ckpt.directory();
        if (Files.exists(dir.resolve("quantization.json"))) {
            throw new IllegalArgumentException(dir + " is a quantized artifact, not a Hugging Face checkpoint: load it"
                    + " with QuantizedArtifact.loadDeepSeek (or ModelDirectories.loadDeepSeek, which takes either)");
        }
        throw new IllegalArgumentException(dir + " holds the weights of a quantized artifact (safetensors metadata"
                + " quantization=djl-memopt-quantized), but the artifact's quantization.json is missing (deleted, or"
                + " written by an export that did not finish): export it again from the original model");
    }

    private static String where(HfCheckpoint ckpt, String name) {
        return ckpt.fileOf(name) == null ? ckpt.directory().toString() : ckpt.fileOf(name).path().toString();
    }

    /** Reads one tensor when DJL allocates its parameter, checking the shape first. */
    private static final class FromCheckpoint implements Initializer {
        private final HfCheckpoint ckpt;
        private final String name;
        private final boolean placeholder;

        FromCheckpoint(HfCheckpoint ckpt, String name, boolean placeholder) {
            this.ckpt = ckpt;
            this.name = name;
            this.placeholder = placeholder;
        }

        @Override
        public NDArray initialize(NDManager manager, Shape shape, DataType dataType) {
            TensorInfo info = ckpt.info(name);
            if (!info.djlShape().equals(shape)) {
                throw new IllegalArgumentException(where(ckpt, name) + ": tensor '" + name + "' has shape "
                        + info.djlShape() + ", the model expects " + shape);
            }
            if (placeholder) {
                return manager.zeros(new Shape(1), dataType);
            }
            try {
                return ckpt.load(manager, name, dataType);
            } catch (IOException e) {
                throw new UncheckedIOException(new IOException(where(ckpt, name) + ": cannot read tensor '" + name
                        + "': " + e.getMessage(), e));
            }
        }
    }
}
