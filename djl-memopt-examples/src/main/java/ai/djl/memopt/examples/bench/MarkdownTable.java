package ai.djl.memopt.examples.bench;

import ai.djl.memopt.safetensors.AtomicFiles;
import com.google.common.base.Preconditions;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * A results table kept inside a markdown file between two HTML comment markers (e.g. {@code <!-- bench-quant:begin -->}
 * and {@code <!-- bench-quant:end -->}), so that benchmark commands can update their own table in a shared page such
 * as {@code docs/benchmarks.md} without touching the prose or the other tables around it.
 *
 * <p>Rows are keyed by their first {@code keyColumns} cells: a new result replaces the row of the same configuration,
 * others are kept in their order, new ones appended. A file without the markers gets the table appended; a missing
 * file is created. The file is rewritten atomically.
 *
 * <pre>{@code
 * MarkdownTable.update(Path.of("docs/benchmarks.md"), "bench-quant", HEADER, ALIGN, 2, rows);
 * }</pre>
 */
public final class MarkdownTable {

    private MarkdownTable() {}

    /** The begin marker of table {@code name}. */
    public static String begin(String name) {
        return "<!-- " + name + ":begin -->";
    }

    /** The end marker of table {@code name}. */
    public static String end(String name) {
        return "<!-- " + name + ":end -->";
    }

    /**
     * Merges {@code rows} into table {@code name} of {@code file}.
     *
     * @param header the column titles
     * @param align one separator cell per column ({@code ---} or {@code ---:})
     * @param keyColumns how many leading cells identify a configuration
     * @param rows the new rows, each with {@code header.size()} cells
     */
    public static void update(Path file, String name, List<String> header, List<String> align, int keyColumns,
            List<List<String>> rows) throws IOException {
        Preconditions.checkArgument(header.size() == align.size(), "header has %s columns, align %s", header.size(),
                align.size());
        Preconditions.checkArgument(keyColumns >= 1 && keyColumns <= header.size(), "keyColumns %s of %s columns",
                keyColumns, header.size());
        String begin = begin(name);
        String end = end(name);
        String text = Files.isRegularFile(file) ? Files.readString(file, StandardCharsets.UTF_8) : "";
        Map<String, List<String>> merged = new LinkedHashMap<>();
        int b = text.indexOf(begin);
        int e = text.indexOf(end);
        String before = text;
        String after = "";
        if (b >= 0 && e > b) {
            for (String line : text.substring(b + begin.length(), e).split("\n")) {
                List<String> cells = cells(line);
                if (cells != null && cells.size() == header.size() && !cells.equals(header)
                        && !cells.get(0).startsWith("---")) {
                    merged.put(key(cells, keyColumns), cells);
                }
            }
            before = text.substring(0, b);
            after = text.substring(e + end.length());
        } else if (!text.isEmpty() && !text.endsWith("\n")) {
            before = text + "\n";
        }
        for (List<String> row : rows) {
            Preconditions.checkArgument(row.size() == header.size(), "row %s has %s cells, the table %s", row,
                    row.size(), header.size());
            merged.put(key(row, keyColumns), row);
        }
        StringBuilder sb = new StringBuilder(before).append(begin).append('\n');
        sb.append(row(header)).append(row(align));
        for (List<String> r : merged.values()) {
            sb.append(row(r));
        }
        sb.append(end).append(after.isEmpty() ? "\n" : after);
        AtomicFiles.writeString(file, sb.toString());
    }

    /** The rows of table {@code name} in {@code file} (without header and separator); empty if it has none. */
    public static List<List<String>> read(Path file, String name) throws IOException {
        List<List<String>> out = new ArrayList<>();
        if (!Files.isRegularFile(file)) {
            return out;
        }
        String text = Files.readString(file, StandardCharsets.UTF_8);
        int b = text.indexOf(begin(name));
        int e = text.indexOf(end(name));
        if (b < 0 || e < b) {
            return out;
        }
        boolean headerSeen = false;
        for (String line : text.substring(b + begin(name).length(), e).split("\n")) {
            List<String> cells = cells(line);
            if (cells == null) {
                continue;
            }
            if (!headerSeen) {
                headerSeen = true;
            } else if (!cells.get(0).startsWith("---")) {
                out.add(cells);
            }
        }
        return out;
    }

    private static String key(List<String> cells, int n) {
        return String.join("|", cells.subList(0, n));
    }

    private static String row(List<String> cells) {
        return "| " + String.join(" | ", cells) + " |\n";
    }

    private static List<String> cells(String line) {
        String t = line.trim();
        if (!t.startsWith("|") || !t.endsWith("|") || t.length() < 2) {
            return null;
        }
        List<String> parts = new ArrayList<>();
        for (String p : t.substring(1, t.length() - 1).split("\\|", -1)) {
            parts.add(p.trim());
        }
        return parts;
    }
}
