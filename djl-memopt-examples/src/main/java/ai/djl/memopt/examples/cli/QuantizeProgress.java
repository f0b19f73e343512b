package ai.djl.memopt.examples.cli;

import ai.djl.memopt.quantize.QuantizationProgress;

/** A {@link ProgressBar} on stderr fed by the quantizer, layer by layer; the line ends with the last layer. */
final class QuantizeProgress {

    private QuantizeProgress() {}

    /** A progress listener drawing {@code label [====>  ] 12/104 0:15, ETA 1:02  model.layers.1.mlp...}. */
    static QuantizationProgress bar(String label) {
        ProgressBar[] bar = new ProgressBar[1];
        return (done, total, path) -> {
            if (bar[0] == null) {
                bar[0] = new ProgressBar(System.err, label, total);
            }
            bar[0].update(done, path);
            if (done == total) {
                bar[0].finish();
            }
        };
    }
}
