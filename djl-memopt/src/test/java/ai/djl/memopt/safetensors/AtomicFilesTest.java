package ai.djl.memopt.safetensors;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.PosixFilePermissions;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class AtomicFilesTest {

    @TempDir Path tmp;

    @Test
    void writesReadableFilesAndLeavesTheOldOneOnFailure() throws IOException {
        Path target = tmp.resolve("sub/config.json");
        AtomicFiles.writeString(target, "{\"a\":1}");
        assertEquals("{\"a\":1}", Files.readString(target));
        assertEquals("rw-r--r--", PosixFilePermissions.toString(Files.getPosixFilePermissions(target)),
                "other users can read (and so serve) what was written");

        IOException e = assertThrows(IOException.class, () -> AtomicFiles.write(target, t -> {
            Files.writeString(t, "half");
            throw new IOException("disk full");
        }));
        assertEquals("disk full", e.getMessage());
        assertEquals("{\"a\":1}", Files.readString(target), "the old content survives a failed write");
        try (var files = Files.list(target.getParent())) {
            assertEquals(List.of(target), files.toList(), "no temporary file left behind");
        }

        Path copy = tmp.resolve("copy.json");
        AtomicFiles.copy(target, copy);
        assertEquals("{\"a\":1}", Files.readString(copy));
        AtomicFiles.copy(copy, copy);
        assertEquals("{\"a\":1}", Files.readString(copy), "copying a file onto itself keeps it");
    }
}
