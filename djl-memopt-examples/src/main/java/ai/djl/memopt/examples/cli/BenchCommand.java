package ai.djl.memopt.examples.cli;

import picocli.CommandLine;
import picocli.CommandLine.Command;

/** {@code memopt bench}: benchmarks, each configuration in a fresh JVM; results are printed as JSON lines. */
@Command(
        name = "bench",
        mixinStandardHelpOptions = true,
        description = "Benchmarks (memory, speed, quality); each configuration runs in a fresh JVM.",
        subcommands = {BenchTrainCommand.class, BenchGenerateCommand.class, BenchQuantCommand.class,
            BenchLoadCommand.class, BenchGgufCommand.class, BenchGgufQualityCommand.class,
            BenchOptimizersCommand.class})
public final class BenchCommand implements Runnable {

    @CommandLine.Spec CommandLine.Model.CommandSpec spec;

    @Override
    public void run() {
        spec.commandLine().usage(System.out);
    }
}
