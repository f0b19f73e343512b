package ai.djl.memopt.safetensors;

import java.io.IOException;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.FileSystems;
import java.nio.file.Files;
import java.nio.file.LinkOption;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.nio.file.StandardOpenOption;
import java.nio.file.attribute.PosixFilePermissions;

/**
 * Atomic file writes: the content goes to a temporary file in the target's directory, is forced to disk, gets the
 * ordinary {@code rw-r--r--} permissions (a temporary file is created {@code rw-------}, which would keep another user
 * from serving a model written by this one) and is then renamed over the target. A crash or an error leaves the old
 * file, or none, never a half-written one. {@link #replaceDirectory} does the same for a whole directory.
 */
public final class AtomicFiles {

    /** Writes a temporary file's content. */
    @FunctionalInterface
    public interface Content {
        void writeTo(Path tmp) throws IOException;
    }

    private AtomicFiles() {}

    /** Writes {@code target} atomically with whatever {@code content} writes into the temporary file it is given. */
    public static void write(Path target, Content content) throws IOException {
        Path dir = target.toAbsolutePath().getParent();
        Files.createDirectories(dir);
        Path tmp = Files.createTempFile(dir, "." + target.getFileName() + ".", ".tmp");
        try {
            content.writeTo(tmp);
            CrashPoints.reach("write-file.written");
            try (FileChannel ch = FileChannel.open(tmp, StandardOpenOption.WRITE)) {
                ch.force(true);
            }
            if (FileSystems.getDefault().supportedFileAttributeViews().contains("posix")) {
                Files.setPosixFilePermissions(tmp, PosixFilePermissions.fromString("rw-r--r--"));
            }
            Files.move(tmp, target, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
        } finally {
            Files.deleteIfExists(tmp);
        }
    }

    /** Fills a fresh directory. */
    @FunctionalInterface
    public interface DirectoryContent {
        void writeInto(Path dir) throws IOException;
    }

    /**
     * Replaces the directory {@code target} as a whole: {@code content} fills a hidden sibling
     * ({@code .NAME.tmp-*}), which is renamed {@code .NAME.new-*} once complete and then takes {@code target}'s place.
     * On Linux the two are swapped in one {@code renameat2(RENAME_EXCHANGE)}; elsewhere the old directory is first
     * moved aside ({@code .NAME.old-*}). Either way a crash at any point leaves the old directory or the new one,
     * complete: {@link #recoverDirectory} (called here first, and by readers that want it) finishes an interrupted
     * replacement and removes the leftovers of an earlier crash. {@code target} may not exist yet.
     */
    public static void replaceDirectory(Path target, DirectoryContent content) throws IOException {
        Path dest = target.toAbsolutePath().normalize();
        Path parent = dest.getParent();
        Files.createDirectories(parent);
        recoverDirectory(dest);
        String name = dest.getFileName().toString();
        Path tmp = Files.createTempDirectory(parent, "." + name + ".tmp-");
        Path ready = null;
        try {
            if (FileSystems.getDefault().supportedFileAttributeViews().contains("posix")) {
                Files.setPosixFilePermissions(tmp, PosixFilePermissions.fromString("rwxr-xr-x"));
            }
            content.writeInto(tmp);
            CrashPoints.reach("replace-directory.written");
            ready = parent.resolve("." + name + ".new-" + tmp.getFileName().toString().substring(name.length() + 6));
            Files.move(tmp, ready, StandardCopyOption.ATOMIC_MOVE);
            CrashPoints.reach("replace-directory.ready");
            if (!Files.exists(dest, LinkOption.NOFOLLOW_LINKS)) {
                Files.move(ready, dest, StandardCopyOption.ATOMIC_MOVE);
            } else if (RenameExchange.swap(ready, dest)) {
                CrashPoints.reach("replace-directory.swapped");
                deleteTree(ready); // now the old content
            } else {
                Path old = parent.resolve("." + name + ".old-" + ready.getFileName().toString().substring(name.length() + 6));
                Files.move(dest, old, StandardCopyOption.ATOMIC_MOVE);
                CrashPoints.reach("replace-directory.moved-aside");
                Files.move(ready, dest, StandardCopyOption.ATOMIC_MOVE);
                deleteTree(old);
            }
            ready = null;
        } finally {
            deleteTree(tmp);
            if (ready != null) {
                deleteTree(ready);
            }
        }
    }

    /**
     * Finishes or rolls back a {@link #replaceDirectory} that a crash interrupted, and deletes its leftovers: if
     * {@code target} is missing, a complete new version ({@code .NAME.new-*}) takes its place, else the old one
     * ({@code .NAME.old-*}); partial ones ({@code .NAME.tmp-*}) are deleted. Returns whether {@code target} exists.
     */
    public static boolean recoverDirectory(Path target) throws IOException {
        Path dest = target.toAbsolutePath().normalize();
        Path parent = dest.getParent();
        if (parent == null || !Files.isDirectory(parent)) {
            return false;
        }
        String name = dest.getFileName().toString();
        java.util.List<Path> leftovers = new java.util.ArrayList<>();
        try (java.util.stream.Stream<Path> s = Files.list(parent)) {
            s.filter(p -> {
                String n = p.getFileName().toString();
                return n.startsWith("." + name + ".tmp-") || n.startsWith("." + name + ".new-")
                        || n.startsWith("." + name + ".old-");
            }).sorted().forEach(leftovers::add);
        }
        if (!Files.exists(dest, LinkOption.NOFOLLOW_LINKS)) {
            Path restore = pick(leftovers, "." + name + ".new-");
            if (restore == null) {
                restore = pick(leftovers, "." + name + ".old-");
            }
            if (restore != null) {
                Files.move(restore, dest, StandardCopyOption.ATOMIC_MOVE);
                leftovers.remove(restore);
            }
        }
        for (Path p : leftovers) {
            deleteTree(p);
        }
        return Files.exists(dest, LinkOption.NOFOLLOW_LINKS);
    }

    private static Path pick(java.util.List<Path> paths, String prefix) {
        for (Path p : paths) {
            if (p.getFileName().toString().startsWith(prefix)) {
                return p;
            }
        }
        return null;
    }

    /** Writes bytes atomically. */
    public static void write(Path target, byte[] bytes) throws IOException {
        write(target, tmp -> Files.write(tmp, bytes));
    }

    /** Writes UTF-8 text atomically. */
    public static void writeString(Path target, String text) throws IOException {
        write(target, text.getBytes(StandardCharsets.UTF_8));
    }

    /** Copies {@code source} to {@code target} atomically; copying a file onto itself does nothing. */
    public static void copy(Path source, Path target) throws IOException {
        if (source.toAbsolutePath().normalize().equals(target.toAbsolutePath().normalize())) {
            return;
        }
        write(target, tmp -> Files.copy(source, tmp, StandardCopyOption.REPLACE_EXISTING));
    }

    /** Deletes a file or a directory with everything in it; nothing to do if it does not exist. */
    public static void deleteTree(Path path) throws IOException {
        if (!Files.exists(path, java.nio.file.LinkOption.NOFOLLOW_LINKS)) {
            return;
        }
        try (java.util.stream.Stream<Path> s = Files.walk(path)) {
            for (Path p : (Iterable<Path>) s.sorted(java.util.Comparator.reverseOrder())::iterator) {
                Files.deleteIfExists(p);
            }
        }
    }
}
