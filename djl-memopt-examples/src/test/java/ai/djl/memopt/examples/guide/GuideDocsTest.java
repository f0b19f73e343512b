package ai.djl.memopt.examples.guide;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import ai.djl.memopt.examples.cli.MemoptCli;
import ai.djl.memopt.safetensors.AtomicFiles;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import picocli.CommandLine;

/**
 * The user guide agrees with the code: its Java snippets are the sources of {@code ai.djl.memopt.examples.guide}
 * (which compile and run in {@link GuideSnippetsTest}), its help blocks are what {@code memopt <cmd> --help} prints,
 * and every {@code memopt} command line in the docs and the README parses with the current option names.
 *
 * <p>After changing a snippet or an option, regenerate the guide's blocks with
 * {@code mvn -pl djl-memopt-examples -am test -Dtest=GuideDocsTest -Dsurefire.failIfNoSpecifiedTests=false
 * -Dmemopt.updateDocs=true}, and read the diff.
 */
class GuideDocsTest {

    /** The jar the build makes; every command line in the docs runs it from the project root. */
    static final String JAR = "djl-memopt-examples/target/memopt.jar";

    private static String source(GuideDocs.Block b) {
        try {
            return b.kind().equals("snippet") ? GuideDocs.snippet(b.key()) : help(b.key());
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    /** What {@code memopt <command> --help} prints. */
    static synchronized String help(String command) {
        List<String> args = new ArrayList<>(command.isEmpty() ? List.of() : List.of(command.split(" ")));
        args.add("--help");
        PrintStream old = System.out;
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        try {
            System.setOut(new PrintStream(out, true, StandardCharsets.UTF_8));
            int code = MemoptCli.execute(args.toArray(new String[0]));
            assertEquals(0, code, "memopt " + command + " --help");
        } finally {
            System.setOut(old);
        }
        return out.toString(StandardCharsets.UTF_8);
    }

    @Test
    void snippetsAndHelpBlocksEqualTheirSources() throws IOException {
        String guide = Files.readString(GuideDocs.GUIDE, StandardCharsets.UTF_8);
        if (Boolean.getBoolean("memopt.updateDocs")) {
            AtomicFiles.writeString(GuideDocs.GUIDE, GuideDocs.rewrite(guide, GuideDocsTest::source));
            return;
        }
        List<GuideDocs.Block> blocks = GuideDocs.blocks(guide);
        assertFalse(blocks.isEmpty(), "no generated blocks found in " + GuideDocs.GUIDE);
        for (GuideDocs.Block b : blocks) {
            assertEquals(source(b), b.text(), "docs/user-guide.md, block <!-- " + b.kind() + ": " + b.key()
                    + " --> differs from its source; regenerate with -Dmemopt.updateDocs=true (see this test's doc)");
        }
    }

    @Test
    void everyJavaBlockIsACheckedSnippetAndEverySnippetIsShown() throws IOException {
        String guide = Files.readString(GuideDocs.GUIDE, StandardCharsets.UTF_8);
        int javaBlocks = guide.split("\n```java\n", -1).length - 1;
        Map<String, GuideDocs.Block> snippets = GuideDocs.byKey(GuideDocs.blocks(guide), "snippet");
        assertEquals(javaBlocks, snippets.size(), "every ```java block of the guide is a <!-- snippet: ... --> block");
        assertEquals(new TreeSet<>(GuideDocs.snippetClasses()), new TreeSet<>(snippets.keySet()),
                "every snippet class is shown in the guide, once");
    }

    @Test
    void everyCommandHasItsHelpInTheGuide() throws IOException {
        String guide = Files.readString(GuideDocs.GUIDE, StandardCharsets.UTF_8);
        Set<String> shown = GuideDocs.byKey(GuideDocs.blocks(guide), "help").keySet();
        Set<String> commands = new TreeSet<>();
        collect(new CommandLine(new MemoptCli()), "", commands);
        assertEquals(commands, new TreeSet<>(shown), "a help block per command (the root's key is empty)");
    }

    private static void collect(CommandLine cli, String prefix, Set<String> out) {
        out.add(prefix);
        for (Map.Entry<String, CommandLine> e : cli.getSubcommands().entrySet()) {
            if (!e.getKey().equals("help")) {
                collect(e.getValue(), (prefix.isEmpty() ? "" : prefix + " ") + e.getKey(), out);
            }
        }
    }

    @Test
    void commandLinesInTheDocsRunTheBuiltJarWithCurrentOptionNames() throws IOException {
        List<Path> files = new ArrayList<>(List.of(GuideDocs.README));
        try (Stream<Path> s = Files.list(GuideDocs.DOCS)) {
            s.filter(p -> p.toString().endsWith(".md")).sorted().forEach(files::add);
        }
        Set<String> hidden = hiddenAliases();
        int checked = 0;
        for (Path file : files) {
            for (List<String> words : commandLines(Files.readString(file, StandardCharsets.UTF_8))) {
                String where = file.getFileName() + ": " + String.join(" ", words);
                int jar = words.indexOf("-jar");
                int cp = words.indexOf("-cp");
                if (jar >= 0) {
                    assertEquals(JAR, words.get(jar + 1), "the jar the build makes, run from the root: " + where);
                    List<String> args = words.subList(jar + 2, words.size());
                    try {
                        new CommandLine(new MemoptCli()).parseArgs(args.toArray(new String[0]));
                    } catch (CommandLine.ParameterException e) {
                        fail(where + ": " + e.getMessage());
                    }
                    for (String a : args) {
                        String name = a.contains("=") ? a.substring(0, a.indexOf('=')) : a;
                        assertFalse(hidden.contains(name), "an old option name in the docs: " + where);
                    }
                    checked++;
                } else if (cp >= 0) {
                    assertEquals(JAR, words.get(cp + 1), "the jar the build makes, run from the root: " + where);
                }
            }
        }
        assertTrue(checked >= 20, "command lines checked: " + checked);
    }

    /** The old option names help hides (read from the CLI, so this test follows it). */
    @SuppressWarnings("unchecked")
    private static Set<String> hiddenAliases() {
        try {
            var f = Class.forName("ai.djl.memopt.examples.cli.MemoptHelp").getDeclaredField("HIDDEN_ALIASES");
            f.setAccessible(true);
            return (Set<String>) f.get(null);
        } catch (ReflectiveOperationException e) {
            throw new IllegalStateException(e);
        }
    }

    private static final Pattern FENCE = Pattern.compile("```[a-z]*\\n(.*?)```", Pattern.DOTALL);

    /** The {@code java ...} command lines in the fenced blocks of a markdown text, as shell words. */
    static List<List<String>> commandLines(String markdown) {
        List<List<String>> out = new ArrayList<>();
        Matcher m = FENCE.matcher(markdown);
        while (m.find()) {
            String block = m.group(1).replace("\\\n", " ");
            for (String line : block.split("\n")) {
                String t = line.strip();
                if (t.startsWith("$ ")) {
                    t = t.substring(2);
                }
                int start = t.indexOf("java -");
                if (start < 0 || t.startsWith("#")) {
                    continue;
                }
                List<String> words = words(t.substring(start));
                if (!words.isEmpty()) {
                    out.add(words);
                }
            }
        }
        return out;
    }

    /** Shell words up to a comment or an operator, with quotes removed. */
    static List<String> words(String line) {
        List<String> words = new ArrayList<>();
        StringBuilder w = null;
        char quote = 0;
        for (int i = 0; i < line.length(); i++) {
            char c = line.charAt(i);
            if (quote != 0) {
                if (c == quote) {
                    quote = 0;
                } else {
                    w.append(c);
                }
                continue;
            }
            if (c == '"' || c == '\'') {
                quote = c;
                w = w == null ? new StringBuilder() : w;
                continue;
            }
            if (Character.isWhitespace(c)) {
                if (w != null) {
                    words.add(w.toString());
                    w = null;
                }
                continue;
            }
            if (w == null && (c == '#' || c == '&' || c == '|' || c == '>' || c == ';')) {
                break;
            }
            w = w == null ? new StringBuilder() : w;
            w.append(c);
        }
        if (w != null) {
            words.add(w.toString());
        }
        return words;
    }
}
