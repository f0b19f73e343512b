package ai.djl.memopt.examples.cli;

import java.io.PrintWriter;
import java.net.URISyntaxException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import picocli.CommandLine;
import picocli.CommandLine.Command;

/**
 * The {@code memopt} command-line tool. Each subcommand lives in its own class; errors go to stderr as
 * {@code memopt <cmd>: <message>} and {@code Try 'memopt <cmd> --help'} with a non-zero exit code (2 for a bad option,
 * 1 for a failure while running), and figures are printed as one JSON line with {@code --json}.
 */
@Command(
        name = "memopt",
        mixinStandardHelpOptions = true,
        versionProvider = MemoptCli.Version.class,
        description = "Fit large language models in less memory with DJL: fine-tune, quantize, generate, serve.",
        subcommands = {
            DemoCommand.class,
            FinetuneCommand.class,
            QuantizeCommand.class,
            PerplexityCommand.class,
            GenerateCommand.class,
            ServeCommand.class,
            BenchCommand.class,
            GgufCommand.class,
            CommandLine.HelpCommand.class
        })
public final class MemoptCli implements Runnable {

    @CommandLine.Spec CommandLine.Model.CommandSpec spec;

    public static void main(String[] args) {
        System.exit(execute(args));
    }

    /** Runs the tool in-process (tests use this) and returns its exit code. */
    public static int execute(String... args) {
        // the tool never downloads libtorch: the CPU build ships in the jar. For a GPU, see docs/gpu.md (point
        // PYTORCH_LIBRARY_PATH at a CUDA libtorch; going online alone does not replace the bundled CPU build)
        if (System.getProperty("ai.djl.offline") == null && System.getenv("MEMOPT_ONLINE") == null) {
            System.setProperty("ai.djl.offline", "true");
        }
        CommandLine cli = new CommandLine(new MemoptCli());
        MemoptHelp.install(cli);
        cli.setExecutionExceptionHandler((e, commandLine, parseResult) -> {
            reportError(commandLine, describe(e));
            if (Boolean.getBoolean("memopt.debug")) {
                e.printStackTrace(commandLine.getErr());
            }
            return 1;
        });
        cli.setParameterExceptionHandler((e, arguments) -> {
            CommandLine commandLine = e.getCommandLine();
            String message = e.getMessage();
            if (e instanceof CommandLine.UnmatchedArgumentException) {
                List<String> suggestions = ((CommandLine.UnmatchedArgumentException) e).getSuggestions();
                if (!suggestions.isEmpty()) {
                    message += "; did you mean " + String.join(" or ", suggestions) + "?";
                }
            }
            reportError(commandLine, message);
            return commandLine.getCommandSpec().exitCodeOnInvalidInput();
        });
        return cli.execute(args);
    }

    /**
     * The one error format of every command: {@code memopt <cmd>: <message>} and a line pointing at the command's
     * help, on stderr, for a bad option as for a failure while running.
     */
    static void reportError(CommandLine commandLine, String message) {
        String name = commandName(commandLine);
        PrintWriter err = commandLine.getErr();
        err.println(name + ": " + message);
        err.println("Try '" + name + " --help'");
        err.flush();
    }

    /** {@code memopt}, {@code memopt quantize} or {@code memopt bench train}. */
    static String commandName(CommandLine commandLine) {
        return commandLine.getCommandSpec().qualifiedName(" ");
    }

    private static String describe(Throwable e) {
        String message = e.getMessage();
        return message == null ? e.getClass().getSimpleName() : message;
    }

    /**
     * How to run this tool again, for hints printed after a command: {@code java -jar PATH} with the path of the
     * running jar (relative to the working directory when it is below it), or the build's jar when run from classes.
     */
    public static String invocation() {
        Path jar = null;
        try {
            Path location = Path.of(MemoptCli.class.getProtectionDomain().getCodeSource().getLocation().toURI());
            if (Files.isRegularFile(location) && location.getFileName().toString().endsWith(".jar")) {
                jar = location;
            }
        } catch (URISyntaxException | RuntimeException e) {
            // no code source (a custom class loader): fall back to the build's path
        }
        if (jar == null) {
            return "java -jar djl-memopt-examples/target/memopt.jar";
        }
        Path cwd = Path.of("").toAbsolutePath();
        Path abs = jar.toAbsolutePath().normalize();
        return "java -jar " + (abs.startsWith(cwd) ? cwd.relativize(abs) : abs);
    }

    @Override
    public void run() {
        spec.commandLine().usage(System.out);
    }

    /** Version from the jar manifest (or "dev" when run from classes). */
    static final class Version implements CommandLine.IVersionProvider {
        @Override
        public String[] getVersion() {
            String v = MemoptCli.class.getPackage().getImplementationVersion();
            return new String[] {"memopt " + (v == null ? "dev" : v)};
        }
    }
}
