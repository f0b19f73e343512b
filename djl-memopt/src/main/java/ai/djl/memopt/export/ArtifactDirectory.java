package ai.djl.memopt.export;

import static ai.djl.memopt.export.QuantizedArtifact.CONFIG;
import static ai.djl.memopt.export.QuantizedArtifact.FORMAT;
import static ai.djl.memopt.export.QuantizedArtifact.METADATA;
import static ai.djl.memopt.export.QuantizedArtifact.WEIGHTS;

import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.NameLists;
import ai.djl.memopt.safetensors.RegularFiles;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.memopt.safetensors.StrictJson;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.LinkOption;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.regex.Pattern;
import java.util.stream.Stream;

/**
 * Decides whether an export may replace a directory as a whole. Replacing deletes everything the directory held, so it
 * is allowed only for a directory that is absent or empty, or that holds a quantized artifact and nothing else:
 * the files its {@code quantization.json} lists, or (an export of an older version killed before writing its
 * manifest) weights that carry this format's safetensors metadata with the files an export writes beside them; plus,
 * in either case, hidden {@code .NAME.*.tmp} files that an older writer left when it was killed. A model's own
 * checkpoint, a directory of other models, or an artifact the user put a file of their own into is refused, naming
 * what would be lost.
 */
final class ArtifactDirectory {

    private static final Pattern SHARD = Pattern.compile("model-\\d{5}-of-\\d{5}\\.safetensors");
    private static final Pattern TEMPORARY = Pattern.compile("\\..+\\.tmp");

    private ArtifactDirectory() {}

    /**
     * Finishes or rolls back a replacement of {@code dir} that a crash interrupted (removing its temporaries), then
     * throws unless an export may replace {@code dir}.
     *
     * @throws IOException naming the directory and the files a replacement would delete
     */
    static void checkReplaceable(Path dir) throws IOException {
        AtomicFiles.recoverDirectory(dir);
        if (!Files.exists(dir, LinkOption.NOFOLLOW_LINKS)) {
            return;
        }
        if (!Files.isDirectory(dir)) {
            throw new IOException(dir + " exists and is not a directory: export to a directory");
        }
        Path absolute = dir.toAbsolutePath().normalize();
        if (Path.of("").toAbsolutePath().normalize().startsWith(absolute)) {
            throw new IOException(dir + " is the working directory or holds it; an export replaces its directory as a"
                    + " whole: export to another directory");
        }
        List<String> entries;
        try (Stream<Path> s = Files.list(dir)) {
            entries = s.map(p -> p.getFileName().toString()).sorted().toList();
        }
        if (entries.isEmpty()) {
            return;
        }
        Set<String> own = artifactFiles(dir);
        if (own == null) {
            if (entries.contains(WEIGHTS) || entries.contains(HfCheckpoint.INDEX_FILE)) {
                // e.g. --out pointing at the source model
                throw new IOException(dir + " holds model weights that are not a quantized artifact (no " + METADATA
                        + "); refusing to overwrite them: export to another directory");
            }
            throw new IOException(dir + " is not empty and not a quantized artifact (it holds "
                    + NameLists.abbreviate(entries) + "); an export replaces its directory as a whole, so it refuses"
                    + " to: export to a new or empty directory");
        }
        List<String> foreign = new ArrayList<>();
        for (String name : entries) {
            if (!own.contains(name) && !TEMPORARY.matcher(name).matches()) {
                foreign.add(name);
            }
        }
        if (!foreign.isEmpty()) {
            throw new IOException(dir + " holds files that are not part of its quantized artifact: "
                    + NameLists.abbreviate(foreign) + " (not listed in its " + METADATA + "). An export replaces the"
                    + " directory as a whole and would delete them: move them away, or export to another directory");
        }
    }

    /** The names the artifact in {@code dir} owns, or null if {@code dir} holds no artifact of this format. */
    private static Set<String> artifactFiles(Path dir) {
        Set<String> own = new HashSet<>();
        try {
            Path metaFile = dir.resolve(METADATA);
            RegularFiles.require(metaFile, METADATA); // a FIFO would block the read
            JsonElement meta = StrictJson.parse(Files.readString(metaFile, StandardCharsets.UTF_8));
            JsonObject o = meta.getAsJsonObject();
            if (FORMAT.equals(o.get("format").getAsString())) {
                own.add(METADATA);
                own.addAll(o.getAsJsonObject("files").keySet());
                return own;
            }
        } catch (IOException | RuntimeException e) {
            // no (readable) manifest: maybe an export killed before it wrote one
        }
        if (!carriesFormat(dir.resolve(WEIGHTS)) && !carriesFormat(firstShard(dir))) {
            return null;
        }
        own.add(WEIGHTS);
        own.add(HfCheckpoint.INDEX_FILE);
        own.add(CONFIG);
        own.addAll(ExportOptions.COMPANIONS);
        try (Stream<Path> s = Files.list(dir)) {
            s.map(p -> p.getFileName().toString()).filter(n -> SHARD.matcher(n).matches()).forEach(own::add);
        } catch (IOException e) {
            return null;
        }
        return own;
    }

    private static Path firstShard(Path dir) {
        try (Stream<Path> s = Files.list(dir)) {
            return s.filter(p -> SHARD.matcher(p.getFileName().toString()).matches()).findFirst().orElse(null);
        } catch (IOException e) {
            return null;
        }
    }

    /** Whether {@code file} is a safetensors file written by this library's export. */
    private static boolean carriesFormat(Path file) {
        if (file == null || !Files.isRegularFile(file)) {
            return false;
        }
        try (SafetensorsFile f = SafetensorsFile.open(file)) {
            return FORMAT.equals(f.metadata().get("quantization"));
        } catch (IOException | RuntimeException e) {
            return false;
        }
    }
}
