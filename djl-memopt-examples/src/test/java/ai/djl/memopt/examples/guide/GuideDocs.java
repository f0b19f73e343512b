package ai.djl.memopt.examples.guide;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.function.Function;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * The generated blocks of a markdown file: a marker comment ({@code <!-- snippet: Name -->} or
 * {@code <!-- help: bench train -->}) on the line before a fenced block says where the block's text comes from. Reads
 * them, and rewrites them from their sources.
 */
final class GuideDocs {

    /** The project's docs (tests run with the module directory as working directory). */
    static final Path DOCS = Path.of("..", "docs").toAbsolutePath().normalize();
    static final Path GUIDE = DOCS.resolve("user-guide.md");
    static final Path README = DOCS.getParent().resolve("README.md");
    static final Path SNIPPETS = Path.of("src", "main", "java", "ai", "djl", "memopt", "examples", "guide");

    private static final Pattern BLOCK = Pattern.compile(
            "<!-- (snippet|help): ?([^>]*?) -->\\n```(\\w+)\\n(.*?)```\\n", Pattern.DOTALL);

    private GuideDocs() {}

    /** A generated block: its kind ({@code snippet} or {@code help}), its key and its current text. */
    record Block(String kind, String key, String fence, String text) {}

    static List<Block> blocks(String markdown) {
        List<Block> out = new ArrayList<>();
        Matcher m = BLOCK.matcher(markdown);
        while (m.find()) {
            out.add(new Block(m.group(1), m.group(2).trim(), m.group(3), m.group(4)));
        }
        return out;
    }

    /** {@code markdown} with every generated block's text replaced by {@code source.apply(block)}. */
    static String rewrite(String markdown, Function<Block, String> source) {
        Matcher m = BLOCK.matcher(markdown);
        StringBuilder sb = new StringBuilder();
        while (m.find()) {
            Block b = new Block(m.group(1), m.group(2).trim(), m.group(3), m.group(4));
            String text = source.apply(b);
            m.appendReplacement(sb, Matcher.quoteReplacement("<!-- " + b.kind() + ": " + b.key() + " -->\n```"
                    + b.fence() + "\n" + text + (text.endsWith("\n") ? "" : "\n") + "```\n"));
        }
        m.appendTail(sb);
        return sb.toString();
    }

    /**
     * What the guide shows of a snippet class: its imports, a blank line, and the lines between
     * {@code // guide:begin} and {@code // guide:end}, one indentation level out.
     */
    static String snippet(String className) throws IOException {
        Path file = SNIPPETS.resolve(className + ".java");
        if (!Files.isRegularFile(file)) {
            throw new IOException("the guide names snippet " + className + " but " + file + " does not exist");
        }
        List<String> lines = Files.readAllLines(file, StandardCharsets.UTF_8);
        StringBuilder sb = new StringBuilder();
        for (String line : lines) {
            if (line.startsWith("import ")) {
                sb.append(line).append('\n');
            }
        }
        sb.append('\n');
        boolean in = false;
        boolean found = false;
        for (String line : lines) {
            if (line.trim().equals("// guide:end")) {
                in = false;
            }
            if (in) {
                sb.append(line.startsWith("    ") ? line.substring(4) : line.strip()).append('\n');
            }
            if (line.trim().equals("// guide:begin")) {
                in = true;
                found = true;
            }
        }
        if (!found) {
            throw new IOException(file + " has no // guide:begin marker");
        }
        return sb.toString();
    }

    /** The snippet classes of the guide package (every .java file there but package-info). */
    static List<String> snippetClasses() throws IOException {
        List<String> out = new ArrayList<>();
        try (var s = Files.list(SNIPPETS)) {
            s.map(p -> p.getFileName().toString()).filter(n -> n.endsWith(".java") && !n.equals("package-info.java"))
                    .sorted().forEach(n -> out.add(n.substring(0, n.length() - 5)));
        }
        return out;
    }

    /** Blocks by key, for lookups. */
    static Map<String, Block> byKey(List<Block> blocks, String kind) {
        Map<String, Block> out = new LinkedHashMap<>();
        for (Block b : blocks) {
            if (b.kind().equals(kind)) {
                out.put(b.key(), b);
            }
        }
        return out;
    }
}
