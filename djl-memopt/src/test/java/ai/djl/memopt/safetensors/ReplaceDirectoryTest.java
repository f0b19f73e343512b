package ai.djl.memopt.safetensors;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.testing.ForkedJvm;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

class ReplaceDirectoryTest {

    @TempDir Path tmp;

    /** Forked: writes version {@code args[1]} of a two-file directory {@code args[0]} (a crash point may stop it). */
    public static void main(String[] args) throws IOException {
        String v = args[1];
        AtomicFiles.replaceDirectory(Path.of(args[0]), dir -> {
            Files.writeString(dir.resolve("a.txt"), "a" + v);
            Files.writeString(dir.resolve("b.txt"), "b" + v);
        });
    }

    private static Map<String, String> contents(Path dir) throws IOException {
        Map<String, String> m = new TreeMap<>();
        try (Stream<Path> s = Files.list(dir)) {
            for (Path p : s.toList()) {
                m.put(p.getFileName().toString(), Files.readString(p));
            }
        }
        return m;
    }

    private static List<String> siblings(Path dir) throws IOException {
        try (Stream<Path> s = Files.list(dir.getParent())) {
            return s.map(p -> p.getFileName().toString()).sorted().toList();
        }
    }

    @ParameterizedTest
    @ValueSource(booleans = {false, true})
    void replacesAWholeDirectoryAndLeavesNothingBehind(boolean noExchange) throws IOException {
        System.setProperty("memopt.noRenameExchange", Boolean.toString(noExchange));
        try {
            Path target = tmp.resolve("model");
            main(new String[] {target.toString(), "1"});
            assertEquals(Map.of("a.txt", "a1", "b.txt", "b1"), contents(target));
            Files.writeString(target.resolve("stale.txt"), "from the old version");
            main(new String[] {target.toString(), "2"});
            assertEquals(Map.of("a.txt", "a2", "b.txt", "b2"), contents(target), "the old directory's files are gone");
            assertEquals(List.of("model"), siblings(target));
        } finally {
            System.clearProperty("memopt.noRenameExchange");
        }
    }

    @Test
    void aFailingWriterLeavesTheOldDirectory() throws IOException {
        Path target = tmp.resolve("model");
        main(new String[] {target.toString(), "1"});
        IOException e = assertThrows(IOException.class, () -> AtomicFiles.replaceDirectory(target, dir -> {
            Files.writeString(dir.resolve("a.txt"), "half");
            throw new IOException("disk full");
        }));
        assertEquals("disk full", e.getMessage());
        assertEquals(Map.of("a.txt", "a1", "b.txt", "b1"), contents(target));
        assertEquals(List.of("model"), siblings(target));
    }

    @Test
    void recoveryPrefersACompleteNewVersionThenTheOldOne() throws IOException {
        Path target = tmp.resolve("m");
        Path old = Files.createDirectories(tmp.resolve(".m.old-1"));
        Files.writeString(old.resolve("x"), "old");
        Path ready = Files.createDirectories(tmp.resolve(".m.new-1"));
        Files.writeString(ready.resolve("x"), "new");
        Files.createDirectories(tmp.resolve(".m.tmp-2"));
        assertTrue(AtomicFiles.recoverDirectory(target));
        assertEquals(Map.of("x", "new"), contents(target));
        assertEquals(List.of("m"), siblings(target));

        AtomicFiles.deleteTree(target);
        Files.writeString(Files.createDirectories(tmp.resolve(".m.old-3")).resolve("x"), "old");
        assertTrue(AtomicFiles.recoverDirectory(target));
        assertEquals(Map.of("x", "old"), contents(target));

        AtomicFiles.deleteTree(target);
        Files.createDirectories(tmp.resolve(".m.tmp-4"));
        assertFalse(AtomicFiles.recoverDirectory(target), "a partial version is never promoted");
        assertEquals(List.of(), siblings(target));
    }

    @ParameterizedTest
    @ValueSource(strings = {
        "replace-directory.written", "replace-directory.ready", "replace-directory.swapped",
        "replace-directory.moved-aside"
    })
    void aKillAtEveryStepLeavesTheOldOrTheNewVersionComplete(String point) throws Exception {
        Path target = tmp.resolve("model");
        main(new String[] {target.toString(), "1"});
        boolean aside = point.endsWith("moved-aside");
        ForkedJvm.Result r = ForkedJvm.run(ReplaceDirectoryTest.class,
                List.of("-Dmemopt.crashAt=" + point, "-Dmemopt.noRenameExchange=" + aside),
                List.of(target.toString(), "2"), Duration.ofMinutes(2));
        assertEquals(137, r.exitCode(), r.output());
        assertTrue(AtomicFiles.recoverDirectory(target));
        Map<String, String> now = contents(target);
        assertTrue(now.equals(Map.of("a.txt", "a1", "b.txt", "b1")) || now.equals(Map.of("a.txt", "a2", "b.txt", "b2")),
                point + " left " + now);
        assertEquals(List.of("model"), siblings(target), "recovery removes the leftovers");
        main(new String[] {target.toString(), "3"});
        assertEquals(Map.of("a.txt", "a3", "b.txt", "b3"), contents(target));
    }
}
