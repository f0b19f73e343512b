package ai.djl.memopt.gguf;

import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Comparator;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.stream.Stream;

/**
 * The side files of a model given as a GGUF file, for code that reads them from a model directory: a temporary
 * directory holding the {@code tokenizer.json}, {@code tokenizer_config.json} and {@code generation_config.json}
 * rebuilt from the file's tokenizer metadata ({@link GgufTokenizer#materialize}), or nothing when it has no text
 * tokenizer. The directory is made once per file and removed when the JVM exits.
 *
 * <pre>{@code
 * Path files = GgufModelFiles.directoryOf(model);       // model itself when it is a directory
 * Path tokenizerJson = files.resolve("tokenizer.json");
 * }</pre>
 */
public final class GgufModelFiles {

    private static final Map<Path, Path> MADE = new ConcurrentHashMap<>();

    static {
        Runtime.getRuntime().addShutdownHook(new Thread(() -> MADE.values().forEach(GgufModelFiles::deleteTree),
                "gguf-side-files-cleanup"));
    }

    private GgufModelFiles() {}

    /**
     * {@code model} when it is not a GGUF file (a model directory), else the directory of its side files.
     *
     * @throws UncheckedIOException if the GGUF file's tokenizer cannot be read or rebuilt
     */
    public static Path directoryOf(Path model) {
        if (!GgufFile.isGguf(model)) {
            return model;
        }
        return MADE.computeIfAbsent(model.toAbsolutePath().normalize(), p -> {
            try {
                Path dir = Files.createTempDirectory("memopt-gguf-");
                try (GgufFile f = GgufFile.open(p)) {
                    GgufTokenizer.materialize(f, dir);
                }
                return dir;
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        });
    }

    private static void deleteTree(Path dir) {
        try (Stream<Path> s = Files.walk(dir)) {
            s.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
        } catch (IOException e) {
            // best effort at exit
        }
    }
}
