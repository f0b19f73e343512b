package ai.djl.memopt.examples.cli;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;

/** Runs the CLI in-process with captured stdout/stderr. */
final class CliRun {

    /** The library module's fixtures (tests run with the module directory as working directory). */
    static final Path FIXTURES = Path.of("..", "djl-memopt", "src", "test", "resources", "fixtures").toAbsolutePath().normalize();

    static final Path WORDLEVEL_TOKENIZER =
            Path.of("..", "djl-memopt", "src", "test", "resources", "tokenizers", "wordlevel-512").toAbsolutePath().normalize();

    /** The tiny V3 fixture plus the word-level tokenizer over its 512 ids, in a fresh directory. */
    static Path v3WithTokenizer(Path dir) throws java.io.IOException {
        Path v3 = FIXTURES.resolve("tiny-deepseek-v3");
        for (String f : new String[] {"config.json", "generation_config.json", "model.safetensors"}) {
            java.nio.file.Files.copy(v3.resolve(f), dir.resolve(f));
        }
        for (String f : new String[] {"tokenizer.json", "tokenizer_config.json"}) {
            java.nio.file.Files.copy(WORDLEVEL_TOKENIZER.resolve(f), dir.resolve(f));
        }
        return dir;
    }

    /** What the word-level tokenizer decodes ids to (special tokens skipped). */
    static String wordLevelText(long[] ids) {
        StringBuilder sb = new StringBuilder();
        String[] named = {null, null, null, "user", "assistant", "system"};
        for (long id : ids) {
            if (id <= 2) {
                continue;
            }
            sb.append(sb.length() == 0 ? "" : " ").append(id < 6 ? named[(int) id] : "w" + id);
        }
        return sb.toString();
    }

    final int exitCode;
    final String out;
    final String err;

    private CliRun(int exitCode, String out, String err) {
        this.exitCode = exitCode;
        this.out = out;
        this.err = err;
    }

    static synchronized CliRun run(String... args) {
        PrintStream oldOut = System.out;
        PrintStream oldErr = System.err;
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        ByteArrayOutputStream err = new ByteArrayOutputStream();
        try {
            System.setOut(new PrintStream(out, true, StandardCharsets.UTF_8));
            System.setErr(new PrintStream(err, true, StandardCharsets.UTF_8));
            int code = MemoptCli.execute(args);
            return new CliRun(code, out.toString(StandardCharsets.UTF_8), err.toString(StandardCharsets.UTF_8));
        } finally {
            System.setOut(oldOut);
            System.setErr(oldErr);
        }
    }
}
