package ai.djl.memopt.finetune;

import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.safetensors.CrashPoints;
import com.google.common.base.Preconditions;
import java.io.IOException;
import java.nio.file.FileVisitResult;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.SimpleFileVisitor;
import java.nio.file.StandardCopyOption;
import java.nio.file.attribute.BasicFileAttributes;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;
import java.util.TreeSet;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Stream;

/**
 * A directory of training checkpoints ({@code step-NNNNNNNN/}, each written by {@link FineTuner#saveCheckpoint} as a
 * whole): finishing what a crash interrupted, choosing the checkpoint a run resumes from, and pruning a run's old
 * checkpoints. Checkpoints carry the {@link RunIdentity} of the run that wrote them: a run resumes from and prunes
 * only its own, so another run's checkpoints in the same directory are neither picked nor deleted.
 *
 * <pre>{@code
 * CheckpointChoice from = CheckpointDirectory.find(dir, tuner.runIdentity());
 * tuner.restoreCheckpoint(from.checkpoint());
 * ...
 * tuner.saveCheckpoint(dir.resolve("step-00000100"));
 * CheckpointDirectory.prune(dir, tuner.runIdentity(), 2);  // this run's two newest stay
 * }</pre>
 */
public final class CheckpointDirectory {

    /** Leftovers of an interrupted {@link AtomicFiles#replaceDirectory}: {@code .NAME.tmp-*}, {@code .new-*}, ... */
    private static final Pattern REPLACING = Pattern.compile("^\\.(.+)\\.(?:tmp|new|old)-[^.]*$");
    /** A pruned checkpoint being deleted: renamed first, so a crash never leaves a partial visible checkpoint. */
    private static final Pattern DELETING = Pattern.compile("^\\.(.+)\\.deleted-[^.]*$");

    /** A checkpoint found in the directory, with what its {@code trainer_state.json} records. */
    record Entry(Path dir, long step, String runId) {}

    private CheckpointDirectory() {}

    /**
     * Finishes or rolls back the checkpoint writes a crash interrupted ({@link AtomicFiles#recoverDirectory}) and
     * deletes what is left of interrupted prunes. Nothing to do if {@code dir} does not exist.
     */
    public static void recover(Path dir) throws IOException {
        if (!Files.isDirectory(dir)) {
            return;
        }
        TreeSet<String> interrupted = new TreeSet<>();
        List<Path> deleting = new ArrayList<>();
        try (Stream<Path> s = Files.list(dir)) {
            for (Path p : (Iterable<Path>) s::iterator) {
                String name = p.getFileName().toString();
                Matcher m = REPLACING.matcher(name);
                if (m.matches()) {
                    interrupted.add(m.group(1));
                } else if (DELETING.matcher(name).matches()) {
                    deleting.add(p);
                }
            }
        }
        for (String name : interrupted) {
            AtomicFiles.recoverDirectory(dir.resolve(name));
        }
        for (Path p : deleting) {
            AtomicFiles.deleteTree(p);
        }
    }

    /**
     * The checkpoints among {@code dir}'s children, newest (highest step) first; a child whose state cannot be read is
     * left out.
     */
    static List<Entry> list(Path dir) throws IOException {
        List<Entry> out = new ArrayList<>();
        try (Stream<Path> s = Files.list(dir)) {
            for (Path c : (Iterable<Path>) s::iterator) {
                if (c.getFileName().toString().startsWith(".") || !TrainingCheckpoints.isCheckpoint(c)) {
                    continue;
                }
                try {
                    out.add(TrainingCheckpoints.entry(c));
                } catch (IOException | RuntimeException unreadable) {
                    // a damaged trainer_state.json: not a candidate (restoring it by name reports the damage)
                }
            }
        }
        out.sort(Comparator.comparingLong(Entry::step).reversed().thenComparing(e -> e.dir().getFileName()));
        return out;
    }

    /** The newest checkpoint of any run in {@code dir}, or {@code dir} itself if it is a checkpoint. */
    public static Path latest(Path dir) throws IOException {
        if (TrainingCheckpoints.isCheckpoint(dir)) {
            return dir;
        }
        if (!Files.isDirectory(dir)) {
            throw new IOException(dir + " does not exist");
        }
        recover(dir);
        List<Entry> all = list(dir);
        if (all.isEmpty()) {
            throw new IOException(dir + " holds no training checkpoint (a directory with trainer_state.json)");
        }
        return all.get(0).dir();
    }

    /**
     * The checkpoint a run of {@code identity} resumes from: {@code dir} itself if it is a checkpoint (its identity is
     * checked when it is restored), else the newest checkpoint of this run among its children.
     *
     * @throws IllegalArgumentException if {@code dir} holds checkpoints, but none of this run: names what differs
     * @throws IOException if it holds none
     */
    public static CheckpointChoice find(Path dir, RunIdentity identity) throws IOException {
        if (TrainingCheckpoints.isCheckpoint(dir)) {
            return new CheckpointChoice(dir, TrainingCheckpoints.entry(dir).step(), List.of());
        }
        latest(dir); // recovers, and says so if there is none at all
        List<Path> others = new ArrayList<>();
        String id = identity.id();
        for (Entry e : list(dir)) {
            if (id.equals(e.runId())) {
                return new CheckpointChoice(e.dir(), e.step(), others);
            }
            others.add(e.dir());
        }
        Path newest = others.get(0);
        List<String> differences;
        try {
            differences = identity.differences(TrainingCheckpoints.identity(newest));
        } catch (IOException | RuntimeException e) {
            differences = List.of(e.getMessage());
        }
        throw new IllegalArgumentException(dir + " holds " + others.size() + " training checkpoint(s), none written"
                + " by this run; the newest, " + newest.getFileName() + ", differs in:\n  "
                + String.join("\n  ", differences));
    }

    /**
     * Checks a checkpoint's files against its {@code manifest.json} (sizes and SHA-256), as a restore does first.
     *
     * @throws IOException naming the checkpoint and the file that is missing, truncated or corrupt
     */
    public static void verify(Path checkpoint) throws IOException {
        CheckpointManifest.verify(checkpoint);
    }

    /**
     * Puts the checkpoints of {@code dir} into {@code into} (a fresh directory that is to replace {@code dir}'s parent
     * as a whole) as hard links to the same files, or copies where links are not possible. Checkpoint files are
     * never changed once written, so both names keep the same content; leftovers of interrupted writes are not
     * carried. Nothing to do if {@code dir} does not exist.
     */
    public static void carryInto(Path dir, Path into) throws IOException {
        if (!Files.isDirectory(dir)) {
            return;
        }
        recover(dir);
        Files.walkFileTree(dir, new SimpleFileVisitor<>() {
            @Override
            public FileVisitResult preVisitDirectory(Path d, BasicFileAttributes attrs) throws IOException {
                if (!d.equals(dir) && d.getFileName().toString().startsWith(".")) {
                    return FileVisitResult.SKIP_SUBTREE;
                }
                Files.createDirectories(into.resolve(dir.relativize(d).toString()));
                return FileVisitResult.CONTINUE;
            }

            @Override
            public FileVisitResult visitFile(Path f, BasicFileAttributes attrs) throws IOException {
                Path target = into.resolve(dir.relativize(f).toString());
                try {
                    Files.createLink(target, f);
                } catch (UnsupportedOperationException | IOException noLink) {
                    Files.copy(f, target, StandardCopyOption.COPY_ATTRIBUTES);
                }
                return FileVisitResult.CONTINUE;
            }
        });
    }

    /** The checkpoints in {@code dir} written by runs of other identities, newest first (none if it does not exist). */
    public static List<Path> otherRuns(Path dir, RunIdentity identity) throws IOException {
        List<Path> out = new ArrayList<>();
        if (Files.isDirectory(dir)) {
            for (Entry e : list(dir)) {
                if (!identity.id().equals(e.runId())) {
                    out.add(e.dir());
                }
            }
        }
        return out;
    }

    /**
     * Deletes the checkpoints of {@code identity} in {@code dir} but the newest {@code keep}; other runs' checkpoints
     * are left alone. Each is renamed to a hidden name before it is deleted, so a crash leaves it whole or invisible.
     *
     * @return the checkpoints deleted
     */
    public static List<Path> prune(Path dir, RunIdentity identity, int keep) throws IOException {
        Preconditions.checkArgument(keep >= 1, "keep must be >= 1, got %s", keep);
        recover(dir);
        List<Path> deleted = new ArrayList<>();
        int kept = 0;
        String id = identity.id();
        for (Entry e : list(dir)) {
            if (!id.equals(e.runId()) || kept++ < keep) {
                continue;
            }
            Path hidden = Files.createTempDirectory(dir, "." + e.dir().getFileName() + ".deleted-");
            Files.delete(hidden);
            Files.move(e.dir(), hidden, StandardCopyOption.ATOMIC_MOVE);
            CrashPoints.reach("checkpoint.prune-renamed");
            AtomicFiles.deleteTree(hidden);
            CrashPoints.reach("checkpoint.pruned");
            deleted.add(e.dir());
        }
        return deleted;
    }
}
