package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import picocli.CommandLine;
import picocli.CommandLine.Model.OptionSpec;

/** One voice across the commands: one name per concept, one error format, help without internal placeholders. */
class CliVoiceTest {

    @TempDir Path tmp;

    /** Every command's path from the root ("bench train"), with its CommandLine. */
    private static void commands(CommandLine cli, String prefix, Map<String, CommandLine> out) {
        out.put(prefix, cli);
        for (Map.Entry<String, CommandLine> e : cli.getSubcommands().entrySet()) {
            if (!e.getKey().equals("help")) {
                commands(e.getValue(), (prefix.isEmpty() ? "" : prefix + " ") + e.getKey(), out);
            }
        }
    }

    private static Map<String, CommandLine> all() {
        Map<String, CommandLine> out = new java.util.TreeMap<>();
        commands(new CommandLine(new MemoptCli()), "", out);
        return out;
    }

    private static String[] args(String command, String... more) {
        List<String> a = new ArrayList<>(command.isEmpty() ? List.of() : List.of(command.split(" ")));
        a.addAll(List.of(more));
        return a.toArray(new String[0]);
    }

    @Test
    void helpShowsCurrentNamesAndLabelsOnly() {
        for (Map.Entry<String, CommandLine> e : all().entrySet()) {
            CliRun r = CliRun.run(args(e.getKey(), "--help"));
            assertEquals(0, r.exitCode, e.getKey());
            assertFalse(r.out.contains("<"), "a <fieldName> placeholder in memopt " + e.getKey() + " --help:\n" + r.out);
            for (String alias : MemoptHelp.HIDDEN_ALIASES) {
                assertFalse(r.out.matches("(?s).*" + alias + "[=,\\s\\]].*"), alias + " shown by memopt " + e.getKey());
            }
            for (OptionSpec o : e.getValue().getCommandSpec().options()) {
                assertFalse(MemoptHelp.HIDDEN_ALIASES.contains(o.names()[0]),
                        "an old name is the first name of " + String.join("/", o.names()) + " in " + e.getKey());
            }
        }
    }

    @Test
    void oldNamesStillSetTheSameOptions() {
        FinetuneCommand f = new FinetuneCommand();
        new CommandLine(f).parseArgs("--preset", "bench-tiny", "--data", "x", "--steps", "1", "--save", "o",
                "--precision", "fp16", "--lora", "4", "--quantize", "int4");
        assertEquals(Path.of("o"), f.save);
        assertEquals("fp16", f.precision);
        assertEquals(4, f.loraRank);
        assertEquals("int4", f.quantize);
        ServeCommand s = new ServeCommand();
        new CommandLine(s).parseArgs("--model", "m", "--max-tokens", "64");
        assertEquals(64, s.maxTokens);
        BenchQuantCommand q = new BenchQuantCommand();
        new CommandLine(q).parseArgs("--model", "m", "--heldout", "h.txt");
        assertEquals(Path.of("h.txt"), q.heldout);
        DemoCommand d = new DemoCommand();
        new CommandLine(d).parseArgs("--new-tokens", "7");
        assertEquals(7, d.newTokens);
    }

    @Test
    void everyErrorIsOneLineAndATryLine() {
        Object[][] cases = {
            // a bad option, a bad value, a missing option, a failure while running, in a nested command too
            {2, new String[] {"quantize", "--model", "m", "--scheme", "int4", "--out", "o", "--bogus"},
                "memopt quantize: Unknown option: '--bogus'"},
            {2, new String[] {"generate", "--model", "m", "--prompt-ids", "1", "--max-new-tokens", "1",
                "--temperature", "3"}, "memopt generate: Invalid value for option '--temperature': must be in [0, 2]"
                    + " (0 = greedy), got 3"},
            {2, new String[] {"serve", "--model", "m", "--port", "70000"},
                "memopt serve: Invalid value for option '--port': must be a port in [0, 65535]"},
            {2, new String[] {"perplexity", "--token-ids", "1,2"}, "memopt perplexity: Missing required option:"
                    + " '--model=DIR'"},
            {1, new String[] {"perplexity", "--model", tmp.resolve("none").toString(), "--token-ids", "1,2"},
                "memopt perplexity: model directory " + tmp.resolve("none") + " does not exist"},
            {1, new String[] {"bench", "train", "--heap", "lots"},
                "memopt bench train: --heap: expected a JVM heap size such as 512m or 3g, got 'lots'"},
            {2, new String[] {"finetun"}, "memopt: Unmatched argument at index 0: 'finetun'; did you mean finetune"},
        };
        for (Object[] c : cases) {
            String[] a = (String[]) c[1];
            CliRun r = CliRun.run(a);
            String[] lines = r.err.replace("\r", "").strip().split("\n");
            assertEquals(c[0], r.exitCode, String.join(" ", a) + ": " + r.err);
            assertEquals(2, lines.length, "one message line and one Try line: " + r.err);
            assertTrue(lines[0].startsWith((String) c[2]), lines[0]);
            String command = lines[0].substring(0, lines[0].indexOf(':'));
            assertEquals("Try '" + command + " --help'", lines[1]);
        }
    }

    @Test
    void benchCommandsShareOptionsWithTheirOwnDefaults() {
        String[][] expected = {{"bench train", "512m", "3600"}, {"bench generate", "3g", "3600"},
            {"bench quant", "3g", "3600"}, {"bench load", "2g", "7200"}};
        for (String[] e : expected) {
            CliRun r = CliRun.run(args(e[0], "--help"));
            String help = r.out.replaceAll("\\s+", " ");
            assertTrue(help.contains("--heap=SIZE Java heap of each worker JVM (default " + e[1]), e[0] + ": " + help);
            assertTrue(help.contains("--timeout=SECONDS Time limit of each worker JVM (default " + e[2] + ")"), help);
            for (String option : new String[] {"--out=FILE", "--chart=FILE.png", "--json"}) {
                assertTrue(help.contains(option), e[0] + " has " + option);
            }
        }
    }
}
