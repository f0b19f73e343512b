package ai.djl.memopt.examples.bench;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class MarkdownTableTest {

    private static final List<String> HEADER = List.of("a", "b", "value");
    private static final List<String> ALIGN = List.of("---", "---", "---:");

    @TempDir Path tmp;

    @Test
    void rowsOfTheSameKeyAreReplacedAndOtherTablesAndProseKept() throws Exception {
        Path md = tmp.resolve("b.md");
        Files.writeString(md, "# B\n" + MarkdownTable.begin("other") + "\n| x |\n" + MarkdownTable.end("other")
                + "\nprose\n");
        MarkdownTable.update(md, "t", HEADER, ALIGN, 2, List.of(List.of("p", "1", "10"), List.of("p", "2", "20")));
        MarkdownTable.update(md, "t", HEADER, ALIGN, 2, List.of(List.of("p", "2", "21"), List.of("q", "1", "5")));
        String text = Files.readString(md, StandardCharsets.UTF_8);
        assertTrue(text.startsWith("# B\n" + MarkdownTable.begin("other") + "\n| x |\n" + MarkdownTable.end("other")
                + "\nprose\n" + MarkdownTable.begin("t") + "\n| a | b | value |\n| --- | --- | ---: |\n"), text);
        assertEquals(List.of(List.of("p", "1", "10"), List.of("p", "2", "21"), List.of("q", "1", "5")),
                MarkdownTable.read(md, "t"));
        assertTrue(text.endsWith(MarkdownTable.end("t") + "\n"), text);
        assertEquals(List.of(), MarkdownTable.read(md, "missing"));
    }

    @Test
    void aMissingFileIsCreatedAndBadRowsRejected() throws Exception {
        Path md = tmp.resolve("sub").resolve("new.md");
        MarkdownTable.update(md, "t", HEADER, ALIGN, 1, List.of(List.of("p", "1", "10")));
        assertEquals(List.of(List.of("p", "1", "10")), MarkdownTable.read(md, "t"));
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> MarkdownTable.update(md, "t", HEADER, ALIGN, 1, List.of(List.of("p", "1"))));
        assertTrue(e.getMessage().contains("has 2 cells"), e.getMessage());
        assertEquals(List.of(List.of("p", "1", "10")), MarkdownTable.read(md, "t"));
    }
}
