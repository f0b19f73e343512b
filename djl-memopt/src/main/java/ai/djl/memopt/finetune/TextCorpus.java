package ai.djl.memopt.finetune;

import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.stream.Collectors;
import java.util.stream.Stream;

/**
 * Plain-text training documents: one UTF-8 file, or every {@code .txt} file directly in a directory, in sorted file
 * name order (so the token stream, and with it the batches, do not depend on the file system's listing order).
 * Invalid UTF-8 is an error naming the file, not silently replaced.
 *
 * <pre>{@code
 * TextCorpus corpus = TextCorpus.read(Path.of("speeches/"));
 * }</pre>
 */
public final class TextCorpus {

    private final List<String> names;
    private final List<String> texts;

    private TextCorpus(List<String> names, List<String> texts) {
        this.names = names;
        this.texts = texts;
    }

    /**
     * Reads a file or a directory of {@code .txt} files.
     *
     * @throws IllegalArgumentException if the path does not exist, the directory has no {@code .txt} file, or every
     *     document is empty
     * @throws IOException if a file cannot be read or is not valid UTF-8
     */
    public static TextCorpus read(Path path) throws IOException {
        Preconditions.checkNotNull(path, "path");
        List<Path> files;
        if (Files.isDirectory(path)) {
            try (Stream<Path> s = Files.list(path)) {
                files = s.filter(p -> Files.isRegularFile(p) && p.getFileName().toString().endsWith(".txt"))
                        .sorted()
                        .collect(Collectors.toList());
            }
            Preconditions.checkArgument(!files.isEmpty(), "directory %s has no .txt file", path);
        } else if (Files.isRegularFile(path)) {
            files = List.of(path);
        } else {
            throw new IllegalArgumentException("training text " + path + " does not exist");
        }
        ImmutableList.Builder<String> names = ImmutableList.builder();
        ImmutableList.Builder<String> texts = ImmutableList.builder();
        boolean any = false;
        for (Path f : files) {
            String text = decode(f);
            any |= !text.isBlank();
            names.add(f.getFileName().toString());
            texts.add(text);
        }
        Preconditions.checkArgument(any, "the training text in %s is empty", path);
        return new TextCorpus(names.build(), texts.build());
    }

    /** A corpus from strings (documents in the given order). */
    public static TextCorpus of(List<String> documents) {
        Preconditions.checkArgument(!documents.isEmpty(), "no documents");
        ImmutableList.Builder<String> names = ImmutableList.builder();
        for (int i = 0; i < documents.size(); i++) {
            names.add("document-" + i);
        }
        return new TextCorpus(names.build(), ImmutableList.copyOf(documents));
    }

    private static String decode(Path f) throws IOException {
        byte[] bytes = Files.readAllBytes(f);
        try {
            return StandardCharsets.UTF_8.newDecoder()
                    .onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT)
                    .decode(ByteBuffer.wrap(bytes))
                    .toString();
        } catch (CharacterCodingException e) {
            throw new IOException(f + " is not valid UTF-8 text: " + e.getMessage(), e);
        }
    }

    /** File names (or {@code document-i}), in order. */
    public List<String> names() {
        return names;
    }

    /** Document texts, in order. */
    public List<String> texts() {
        return texts;
    }

    /** Number of documents. */
    public int size() {
        return texts.size();
    }
}
