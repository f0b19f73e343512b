package ai.djl.memopt.export;

import ai.djl.memopt.safetensors.HfCheckpoint;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import com.google.common.collect.ImmutableSet;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collection;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Set;

/**
 * Options of {@link QuantizedArtifact#export}: the source model's {@code config.json} to copy, the source checkpoint
 * files whose sha256 is recorded (provenance), the architecture name, the quantization method per layer (from the
 * report) and which unquantized Linear layers to store in compact 2:4 form.
 */
public final class ExportOptions {

    private final Path configJson;
    private final List<Path> sourceFiles;
    private final List<Path> companionFiles;
    private final String architecture;
    private final Set<String> sparse24Layers;
    private final String extraJson;
    private final long maxShardBytes;

    /**
     * Files of a Hugging Face model directory that an artifact carries along (tokenizer, chat template, generation
     * settings): what a tokenizer or generator reads beside the weights.
     */
    static final List<String> COMPANIONS = List.of("tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json");

    private ExportOptions(Builder b) {
        this.maxShardBytes = b.maxShardBytes;
        this.configJson = b.configJson;
        this.companionFiles = List.copyOf(b.companionFiles);
        this.sourceFiles = ImmutableList.copyOf(b.sourceFiles);
        this.architecture = b.architecture;
        this.sparse24Layers = ImmutableSet.copyOf(b.sparse24Layers);
        this.extraJson = b.extraJson;
    }

    /** A builder. */
    public static Builder builder() {
        return new Builder();
    }

    /** The config.json to copy, or null. */
    public Path configJson() {
        return configJson;
    }

    /**
     * Files copied into the artifact unchanged (and checksummed) so that it serves on its own: the tokenizer and
     * generation settings of the source model.
     */
    public List<Path> companionFiles() {
        return companionFiles;
    }

    /** Source checkpoint files to fingerprint. */
    public List<Path> sourceFiles() {
        return sourceFiles;
    }

    /**
     * Architecture name recorded in the metadata, or null for the default: {@code "deepseek"} for a
     * {@code DeepSeekForCausalLM}, otherwise {@code "generic"}.
     */
    public String architecture() {
        return architecture;
    }

    /** Block paths of 2:4-pruned, unquantized Linear layers stored compactly. */
    public Set<String> sparse24Layers() {
        return sparse24Layers;
    }

    /** A JSON object (text) recorded verbatim under {@code "reports"}, or null. */
    public String extraJson() {
        return extraJson;
    }

    /** Weight bytes per safetensors file before the export is sharded (default 5 GiB, as transformers). */
    public long maxShardBytes() {
        return maxShardBytes;
    }

    /** Builder for {@link ExportOptions}. */
    public static final class Builder {
        private Path configJson;
        private final List<Path> sourceFiles = new ArrayList<>();
        private final List<Path> companionFiles = new ArrayList<>();
        private String architecture;
        private final Set<String> sparse24Layers = new LinkedHashSet<>();
        private String extraJson;
        private long maxShardBytes = 5L << 30;

        private Builder() {}

        /** Shard the weights past this many bytes per file (Hugging Face index layout). */
        public Builder optMaxShardBytes(long bytes) {
            Preconditions.checkArgument(bytes > 0, "max shard bytes must be positive, got %s", bytes);
            this.maxShardBytes = bytes;
            return this;
        }

        /** Copies this {@code config.json} into the artifact. */
        public Builder optConfigJson(Path configJson) {
            Preconditions.checkArgument(Files.isRegularFile(configJson), "config.json not found: %s", configJson);
            this.configJson = configJson;
            return this;
        }

        /**
         * The Hugging Face model directory the model was loaded from: copies its {@code config.json} and records the
         * sha256 of its {@code *.safetensors} files and shard index.
         */
        public Builder optSourceModel(Path modelDir) throws java.io.IOException {
            Preconditions.checkArgument(Files.isDirectory(modelDir), "not a directory: %s", modelDir);
            optConfigJson(modelDir.resolve("config.json"));
            // the checkpoint's own files only (not, say, a reference.safetensors lying beside them)
            try (HfCheckpoint ckpt = HfCheckpoint.open(modelDir)) {
                sourceFiles.addAll(ckpt.files());
            }
            Path index = modelDir.resolve(HfCheckpoint.INDEX_FILE);
            if (Files.isRegularFile(index)) {
                sourceFiles.add(index);
            }
            for (String name : COMPANIONS) {
                Path f = modelDir.resolve(name);
                if (Files.isRegularFile(f)) {
                    companionFiles.add(f);
                }
            }
            return this;
        }

        /** Copies this file (e.g. a tokenizer) into the artifact under its own name. */
        public Builder optCompanionFile(Path file) {
            Preconditions.checkArgument(Files.isRegularFile(file), "file not found: %s", file);
            companionFiles.add(file);
            return this;
        }

        /** Records the sha256 of these source checkpoint files. */
        public Builder optSourceFiles(Collection<Path> files) {
            for (Path f : files) {
                Preconditions.checkArgument(Files.isRegularFile(f), "source file not found: %s", f);
                sourceFiles.add(f);
            }
            return this;
        }

        /** Architecture name ({@code "generic"}, {@code "deepseek"}). */
        public Builder optArchitecture(String architecture) {
            Preconditions.checkArgument(architecture != null && !architecture.isEmpty(), "empty architecture");
            this.architecture = architecture;
            return this;
        }

        /** Stores these (2:4-pruned, unquantized) Linear layers as kept values + 2-bit positions. */
        public Builder optSparse24Layers(Collection<String> paths) {
            sparse24Layers.addAll(paths);
            return this;
        }

        /** Adds a JSON object (e.g. the quantization and pruning reports) to the metadata. */
        public Builder optReportsJson(String json) {
            this.extraJson = json;
            return this;
        }

        /** Builds the options. */
        public ExportOptions build() {
            return new ExportOptions(this);
        }
    }
}
