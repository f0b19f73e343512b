package ai.djl.memopt.examples.cli;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import java.util.Locale;
import picocli.CommandLine.Option;

/**
 * The demo's model and batches (a picocli mixin), shared by {@code memopt demo} and {@code memopt bench optimizers}
 * so that the benchmark trains what the demo trains:
 *
 * <pre>{@code
 * @Mixin DemoModelOptions demoModel = new DemoModelOptions();
 * DeepSeekConfig config = demoModel.config();
 * }</pre>
 */
public final class DemoModelOptions {

    @Option(names = "--batch", defaultValue = "8", paramLabel = "B", description = "Sequences per step (default 8).")
    int batch;

    @Option(names = "--seq", defaultValue = "128", paramLabel = "T", description = "Tokens per sequence (default 128).")
    int seq;

    @Option(names = "--vocab", defaultValue = "1024", paramLabel = "V",
            description = "Size of the BPE vocabulary trained on the corpus (default 1024).")
    int vocab;

    @Option(names = "--hidden", defaultValue = "128", paramLabel = "H", description = "Model width (default 128).")
    int hidden;

    @Option(names = "--layers", defaultValue = "4", paramLabel = "L", description = "Decoder layers (default 4).")
    int layers;

    @Option(names = "--lr", defaultValue = "3e-3", paramLabel = "X", description = "Peak learning rate (default 3e-3).")
    float lr;

    /** Rejects a size the demo's model cannot take, naming every option and its value. */
    void validate() {
        if (batch < 1 || seq < 8 || vocab < 258 || hidden < 16 || hidden % 16 != 0 || layers < 2 || !(lr > 0)) {
            throw new IllegalArgumentException(String.format(Locale.ROOT, "need --batch >= 1, --seq >= 8, --vocab >="
                    + " 258, --hidden a multiple of 16, --layers >= 2, --lr > 0; got --batch %d, --seq %d, --vocab %d,"
                    + " --hidden %d, --layers %d, --lr %s", batch, seq, vocab, hidden, layers, lr));
        }
    }

    /** The model: {@link DemoCommand#demoConfig} at these sizes. */
    DeepSeekConfig config() {
        return DemoCommand.demoConfig(vocab, hidden, layers, seq);
    }
}
