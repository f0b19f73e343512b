package ai.djl.memopt.examples.guide;

import ai.djl.Device;
import ai.djl.memopt.inference.GenerationModel;
import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.nio.file.Path;
import java.util.List;

/** The guide's snippet for generating with a LoRA adapter on a (quantized) base. */
public final class AdapterInferenceSnippet {

    private AdapterInferenceSnippet() {}

    // guide:begin
    /** Greedy generation from a base model (a directory or an artifact) with a PEFT adapter on it, unmerged. */
    public static long[] generateWithAdapter(Path base, Path adapter, long[] promptIds) throws Exception {
        try (GenerationModel m = GenerationModel.open(base, Device.cpu(), DataType.FLOAT32, adapter);
                NDManager manager = NDManager.newBaseManager(Device.cpu())) {
            GenerationResult r = m.generator().generate(manager, List.of(promptIds), SamplingParams.greedy(16), null,
                    () -> false).get(0);
            return r.outputIds();
        }
    }
    // guide:end
}
