package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.inference.GenerationModel;
import ai.djl.memopt.inference.StagePlan;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Path;
import java.util.List;
import picocli.CommandLine.Model.CommandSpec;
import picocli.CommandLine.Option;

/**
 * The options of {@code memopt generate} and {@code serve} that split the decoder layers over several devices (a
 * picocli mixin): {@code --devices} and {@code --layer-split}. Without {@code --devices} the model opens on the
 * command's {@code --device}.
 *
 * <pre>
 * memopt generate --model DIR --devices gpu0,gpu1 --prompt "Hi" --max-new-tokens 32
 * memopt serve --model DIR --devices gpu0,gpu1,gpu2,gpu3 --layer-split 16,15,15,15
 * </pre>
 */
public final class LayerSplitOptions {

    @Option(names = "--devices", paramLabel = "LIST",
            description = "Split the decoder layers over these devices, in order (e.g. gpu0,gpu1; cpu,cpu runs the"
                    + " same stages on the CPU): consecutive layers on each, each layer's cache on its device, only"
                    + " the hidden state moves between them. Replaces --device.")
    String devices;

    @Option(names = "--layer-split", paramLabel = "N,N,...",
            description = "Layers per device of --devices (e.g. 14,13), or layer ranges (0-13,14-26); default: chosen"
                    + " from each device's free memory.")
    String split;

    /** The device list and the split, checked against {@code --device}; then the model opened over them. */
    GenerationModel open(CommandSpec spec, Path model, String device, DataType dtype, Path adapter)
            throws IOException {
        if (devices == null) {
            if (split != null) {
                throw new IllegalArgumentException("--layer-split needs --devices (the devices the layers are split"
                        + " over)");
            }
            return GenerationModel.open(model, Devices.parse(device), dtype, adapter);
        }
        if (spec.commandLine().getParseResult().hasMatchedOption("--device")) {
            throw new IllegalArgumentException("give --device (one device) or --devices (layers split over several),"
                    + " not both");
        }
        List<Device> list = Devices.parseList(devices, "--devices");
        StagePlan plan = StagePlan.choose(model, list, dtype, split);
        return GenerationModel.open(model, plan, dtype, adapter);
    }
}
