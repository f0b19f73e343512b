package ai.djl.memopt.examples.cli;

import picocli.CommandLine;
import picocli.CommandLine.Command;

/**
 * The {@code memopt} command-line tool. Each subcommand lives in its own class; errors go to stderr with a non-zero
 * exit code, and figures are printed as one JSON line with {@code --json}.
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
        cli.setExecutionExceptionHandler((e, commandLine, parseResult) -> {
            commandLine.getErr().println("memopt " + commandLine.getCommandName() + ": " + describe(e));
            if (Boolean.getBoolean("memopt.debug")) {
                e.printStackTrace(commandLine.getErr());
            }
            return 1;
        });
        return cli.execute(args);
    }

    private static String describe(Throwable e) {
        String message = e.getMessage();
        return message == null ? e.getClass().getSimpleName() : message;
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
