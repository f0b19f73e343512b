package ai.djl.memopt.finetune;

import ai.djl.memopt.safetensors.AtomicFiles;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.security.MessageDigest;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.stream.Stream;

/**
 * The {@code manifest.json} of a training checkpoint, written last: the size and SHA-256 of every other file in the
 * directory. A checkpoint is verified against it before anything is restored, so a flipped bit, a truncated or a
 * swapped file is refused instead of trained on.
 *
 * <pre>
 * {"format": 1, "files": {"model.safetensors": {"bytes": 123, "sha256": "9f86..."}, ...}}
 * </pre>
 */
final class CheckpointManifest {

    static final String FILE = "manifest.json";
    private static final int FORMAT = 1;

    private CheckpointManifest() {}

    /** Writes the manifest of the regular files in {@code dir} (atomically). */
    static void write(Path dir) throws IOException {
        JsonObject files = new JsonObject();
        List<Path> paths;
        try (Stream<Path> s = Files.list(dir)) {
            paths = s.filter(Files::isRegularFile).filter(p -> !p.getFileName().toString().equals(FILE)).sorted()
                    .toList();
        }
        for (Path p : paths) {
            JsonObject f = new JsonObject();
            f.addProperty("bytes", Files.size(p));
            f.addProperty("sha256", sha256(p));
            files.add(p.getFileName().toString(), f);
        }
        JsonObject manifest = new JsonObject();
        manifest.addProperty("format", FORMAT);
        manifest.add("files", files);
        AtomicFiles.writeString(dir.resolve(FILE), new GsonBuilder().setPrettyPrinting().create().toJson(manifest)
                + "\n");
    }

    /**
     * Checks every file the manifest of {@code dir} lists: present, of its size and its SHA-256.
     *
     * @throws IOException naming the checkpoint and the file that is missing or differs
     */
    static void verify(Path dir) throws IOException {
        Path file = dir.resolve(FILE);
        if (!Files.isRegularFile(file)) {
            throw new IOException("training checkpoint " + dir + " has no " + FILE
                    + ": it is incomplete, or was written by an earlier version without checksums");
        }
        JsonObject files;
        try {
            JsonObject manifest = JsonParser.parseString(Files.readString(file, StandardCharsets.UTF_8))
                    .getAsJsonObject();
            if (manifest.get("format").getAsInt() != FORMAT) {
                throw new IOException(file + ": manifest format " + manifest.get("format") + ", this version reads "
                        + FORMAT);
            }
            files = manifest.getAsJsonObject("files");
            if (files == null || files.size() == 0) {
                throw new IOException(file + " lists no files");
            }
        } catch (RuntimeException e) {
            throw new IOException(file + " is corrupt (not a checkpoint manifest): " + e.getMessage(), e);
        }
        for (Map.Entry<String, JsonElement> e : files.entrySet()) {
            String name = e.getKey();
            Path p = dir.resolve(name).normalize();
            if (!p.getParent().equals(dir.normalize()) || !Files.isRegularFile(p)) {
                throw new IOException("training checkpoint " + dir + ": " + name + ", listed in " + FILE
                        + ", is missing");
            }
            long bytes;
            String sha;
            try {
                bytes = e.getValue().getAsJsonObject().get("bytes").getAsLong();
                sha = e.getValue().getAsJsonObject().get("sha256").getAsString();
            } catch (RuntimeException bad) {
                throw new IOException(file + ": entry " + name + " is corrupt: " + e.getValue(), bad);
            }
            long size = Files.size(p);
            if (size != bytes) {
                throw new IOException("training checkpoint " + dir + ": " + name + " has " + size + " bytes, "
                        + FILE + " records " + bytes + " (the file is truncated or was replaced)");
            }
            String actual = sha256(p);
            if (!actual.equals(sha)) {
                throw new IOException("training checkpoint " + dir + ": " + name + " is corrupt: its SHA-256 is "
                        + actual + ", " + FILE + " records " + sha);
            }
        }
    }

    /** The SHA-256 of a file's content, in lower-case hex, read in blocks. */
    static String sha256(Path file) throws IOException {
        MessageDigest digest = RunIdentity.digest();
        ByteBuffer buf = ByteBuffer.allocate(1 << 20);
        try (FileChannel ch = FileChannel.open(file, StandardOpenOption.READ)) {
            while (ch.read(buf) >= 0) {
                buf.flip();
                digest.update(buf);
                buf.clear();
            }
        }
        return HexFormat.of().formatHex(digest.digest());
    }
}
