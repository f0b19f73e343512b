package ai.djl.memopt.safetensors;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.attribute.BasicFileAttributes;

/**
 * Checks that a file about to be read is a regular file: opening a FIFO blocks until some other process writes to it
 * (forever, for a {@code model.safetensors} that is one), and a device or a directory is no model file either.
 * Symbolic links to regular files are followed.
 */
public final class RegularFiles {

    private RegularFiles() {}

    /**
     * Throws unless {@code file} is a regular file.
     *
     * @param what what the file should be, for the message ({@code "safetensors file"}, {@code "config.json"})
     * @throws NoSuchFileException naming the file if it does not exist
     * @throws IOException naming the file and what it is instead (a directory, or a FIFO, socket or device)
     */
    public static void require(Path file, String what) throws IOException {
        BasicFileAttributes a;
        try {
            a = Files.readAttributes(file, BasicFileAttributes.class);
        } catch (NoSuchFileException e) {
            throw new NoSuchFileException(file.toString(), null, what + " not found");
        }
        if (!a.isRegularFile()) {
            String kind = a.isDirectory() ? "a directory" : "a FIFO, socket or device";
            throw new IOException(file + ": " + what + " is not a regular file (it is " + kind
                    + "); refusing to read it");
        }
    }
}
