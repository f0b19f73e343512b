package ai.djl.memopt.inference;

import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.export.QuantizedArtifact;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableSet;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.Optional;
import java.util.Set;

/**
 * The files of a model directory that readers may open. In a Hugging Face directory that is every regular file; in a
 * quantized artifact only the files its manifest lists (and checksums): a {@code tokenizer.json} or
 * {@code generation_config.json} dropped in later is not part of the artifact and is never read.
 *
 * <pre>{@code
 * ModelFiles files = ModelFiles.of(dir);                       // the manifest decides for an artifact
 * Optional<Path> tokenizer = files.find("tokenizer.json");
 * TextTokenizer tok = TextTokenizer.fromFiles(files);
 * }</pre>
 */
public final class ModelFiles {

    private final Path dir;
    private final Set<String> listed; // null: every regular file
    private final String listing;

    private ModelFiles(Path dir, Set<String> listed, String listing) {
        this.dir = Preconditions.checkNotNull(dir, "dir");
        this.listed = listed == null ? null : ImmutableSet.copyOf(listed);
        this.listing = listing;
    }

    /** Every regular file of {@code dir}. */
    public static ModelFiles all(Path dir) {
        return new ModelFiles(dir, null, null);
    }

    /**
     * Only the files named in {@code names}.
     *
     * @param listing what lists them, for messages (e.g. {@code quantization.json})
     */
    public static ModelFiles listed(Path dir, Set<String> names, String listing) {
        Preconditions.checkArgument(names != null, "names must not be null");
        return new ModelFiles(dir, names, listing);
    }

    /**
     * The readable files of a model directory: those its manifest lists for a quantized artifact
     * ({@link ModelDirectories#listedFiles}), every file otherwise.
     *
     * @throws IOException if the artifact's manifest cannot be read, or the artifact holds tokenizer files that its
     *     manifest does not list ({@link ModelDirectories#tokenizerFiles})
     */
    public static ModelFiles of(Path dir) throws IOException {
        ModelDirectories.tokenizerFiles(dir); // refuses tokenizer files an artifact holds but does not list
        Optional<Set<String>> names = ModelDirectories.listedFiles(dir);
        return names.isPresent() ? listed(dir, names.get(), QuantizedArtifact.METADATA) : all(dir);
    }

    public Path dir() {
        return dir;
    }

    /** The file, if it is a regular file that may be read. */
    public Optional<Path> find(String name) {
        Path p = dir.resolve(name);
        if ((listed != null && !listed.contains(name)) || !Files.isRegularFile(p)) {
            return Optional.empty();
        }
        return Optional.of(p);
    }

    /**
     * The file, or a {@link NoSuchFileException} saying why it cannot be read.
     *
     * @param purpose what it is needed for, e.g. "a text prompt"
     */
    public Path require(String name, String purpose) throws NoSuchFileException {
        Optional<Path> p = find(name);
        if (p.isEmpty()) {
            throw new NoSuchFileException(dir.resolve(name).toString(), null, absence(name) + " (needed for " + purpose + ")");
        }
        return p.get();
    }

    /** Why {@link #find} gives nothing for {@code name}, in words. */
    public String absence(String name) {
        Path p = dir.resolve(name);
        if (listed != null && !listed.contains(name) && Files.exists(p)) {
            return p + " is not listed in " + dir.resolve(listing) + ": an artifact uses only the files its manifest lists"
                    + " and checksums";
        }
        if (Files.exists(p) && !Files.isRegularFile(p)) {
            return p + " is not a regular file";
        }
        return "no " + name + " in " + dir;
    }
}
