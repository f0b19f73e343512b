package ai.djl.memopt.examples.demo;

import ai.djl.Device;
import ai.djl.memopt.examples.cli.PerplexityCommand;
import ai.djl.memopt.inference.GenerationModel;
import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.memopt.inference.TextTokenizer;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.DeepSeekDecoderLayer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekMoE;
import ai.djl.memopt.model.deepseek.ModuleList;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import com.google.gson.JsonObject;
import java.nio.file.Path;
import java.util.List;

/**
 * Measures one variant of the demo model in a JVM of its own (so its peak resident memory is its own): loads a model
 * directory or quantized artifact, scores held-out text, generates a sample, and prints one JSON line.
 *
 * <p>Arguments: {@code DIR DTYPE DEVICE HELDOUT_FILE SEQ NEW_TOKENS PROMPT}.
 */
public final class DemoVariantWorker {

    private DemoVariantWorker() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 7) {
            System.err.println("usage: DemoVariantWorker DIR float32|float16 cpu|gpu HELDOUT SEQ NEW_TOKENS PROMPT");
            System.exit(2);
        }
        Path dir = Path.of(args[0]);
        DataType dtype = "float16".equals(args[1]) ? DataType.FLOAT16 : DataType.FLOAT32;
        Device device = "gpu".equals(args[2]) ? Device.gpu() : Device.cpu();
        Path heldOut = Path.of(args[3]);
        int seq = Integer.parseInt(args[4]);
        int newTokens = Integer.parseInt(args[5]);
        String prompt = args[6];

        // the runtime before any weight: the JVM and libtorch, loaded by a first tensor
        try (NDManager warm = NDManager.newBaseManager(device)) {
            warm.ones(new Shape(2)).add(1).close();
        }
        long runtimeBytes = device.isGpu() ? MemoryStats.deviceBytesInUse(device) : MemoryStats.residentBytes();
        try (GenerationModel m = GenerationModel.open(dir, device, dtype)) {
            NDManager weights = m.model().manager();
            long weightBytes = weights.getManagedArrays().stream().filter(a -> !a.isReleased())
                    .mapToLong(DemoVariantWorker::bytes).sum() - stackedExpertBytes(m.model());

            long[] ids = PerplexityCommand.tokenize(dir, heldOut);
            PerplexityCommand.Evaluation eval;
            try (PerplexityCommand.Scorer scorer = PerplexityCommand.scorerOf(m.model(), () -> { })) {
                eval = PerplexityCommand.evaluate(scorer, ids, seq);
            }

            TextTokenizer tok = m.tokenizer().orElseThrow(() -> new IllegalStateException(dir + ": no tokenizer.json"));
            long[] promptIds = tok.encode(prompt);
            // seeded nucleus sampling: a readable sample that is the same on every run; EOS ignored so every variant
            // generates the same number of tokens for tokens/s
            SamplingParams params = SamplingParams.builder().setMaxNewTokens(newTokens).optTemperature(0.8f)
                    .optTopP(0.9f).optSeed(1234).optIgnoreEos(true).build();
            GenerationResult r;
            long t0 = System.nanoTime();
            try (NDManager manager = NDManager.newBaseManager(device)) {
                r = m.generator().generate(manager, List.of(promptIds), params, null, () -> false).get(0);
            }
            double seconds = (System.nanoTime() - t0) / 1e9;

            JsonObject o = new JsonObject();
            o.addProperty("dir", dir.toString());
            o.addProperty("dtype", args[1]);
            o.addProperty("peak_memory_bytes", device.isGpu() ? MemoryStats.deviceBytesInUse(device)
                    : MemoryStats.peakResidentBytes());
            o.addProperty("runtime_bytes", runtimeBytes);
            o.addProperty("weight_bytes", weightBytes);
            o.addProperty("heldout_tokens", ids.length);
            o.addProperty("loss", eval.loss());
            o.addProperty("perplexity", eval.perplexity());
            o.addProperty("new_tokens", r.outputIds().length);
            o.addProperty("tokens_per_second", r.outputIds().length / seconds);
            o.addProperty("sample", prompt + tok.decode(r.outputIds(), true));
            System.out.println(o);
        }
    }

    /**
     * Bytes counted twice above: where the TorchScript decode step stacked a MoE layer's experts, each expert's weight
     * became a view of its stack's slice (its own storage freed), so the manager holds the stack and the views of it.
     */
    static long stackedExpertBytes(DeepSeekForCausalLM lm) {
        long total = 0;
        ModuleList layers = lm.model().layers();
        for (int i = 0; i < layers.size(); i++) {
            Block mlp = ((DeepSeekDecoderLayer) layers.get(i)).mlp();
            if (mlp instanceof DeepSeekMoE) {
                List<NDArray> stacks = ((DeepSeekMoE) mlp).existingExpertStacks();
                if (stacks != null) {
                    total += stacks.stream().mapToLong(DemoVariantWorker::bytes).sum();
                }
            }
        }
        return total;
    }

    private static long bytes(NDArray a) {
        return a.size() * a.getDataType().getNumOfBytes();
    }
}
