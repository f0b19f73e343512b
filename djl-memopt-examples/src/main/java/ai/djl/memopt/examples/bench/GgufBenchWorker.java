package ai.djl.memopt.examples.bench;

import ai.djl.Device;
import ai.djl.engine.Engine;
import ai.djl.memopt.gguf.GgufLoader;
import ai.djl.memopt.inference.MlaCachedDecoder;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonObject;
import java.nio.file.Path;
import java.util.SplittableRandom;

/**
 * Our side of {@code memopt bench gguf}, in a fresh JVM: a GGUF file loaded as {@code --model FILE.gguf} loads it
 * (Q8_0/Q4_0 natively quantized), decoded greedily with the compressed MLA cache exactly as
 * {@link GenerateBenchWorker} times it (batch 1: a warm-up, the prefill, then {@code newTokens - 1} single-token
 * steps); prints one JSON line.
 *
 * <p>Arguments: {@code file.gguf promptTokens newTokens seed}; the prompt is {@code promptTokens} ids drawn from
 * {@code SplittableRandom(seed)} below the vocabulary size (the llama.cpp side gets the same ids).
 */
public final class GgufBenchWorker {

    private GgufBenchWorker() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: GgufBenchWorker file.gguf promptTokens newTokens seed");
            System.exit(2);
        }
        Path file = Path.of(args[0]);
        int prompt = Integer.parseInt(args[1]);
        int newTokens = Integer.parseInt(args[2]);
        long seed = Long.parseLong(args[3]);
        Engine.getInstance().setRandomSeed((int) seed);
        Device device = Device.cpu();
        try (NDManager weights = NDManager.newBaseManager(device);
                NDManager manager = NDManager.newBaseManager(device)) {
            long l0 = System.nanoTime();
            DeepSeekForCausalLM lm = GgufLoader.load(file, weights, DataType.FLOAT32, true);
            double loadSeconds = (System.nanoTime() - l0) / 1e9;
            MlaCachedDecoder decoder = new MlaCachedDecoder(lm, device);
            GenerateBenchWorker.decode(decoder, manager, lm.config(), new SplittableRandom(seed + 1), 1, 8, 3, 8,
                    null);
            double[] seconds = new double[2];
            GenerateBenchWorker.decode(decoder, manager, lm.config(), new SplittableRandom(seed), 1, prompt,
                    newTokens, prompt, seconds);
            JsonObject o = new JsonObject();
            o.addProperty("engine", "djl-memopt");
            o.addProperty("model", file.toString());
            o.addProperty("prompt_tokens", prompt);
            o.addProperty("new_tokens", newTokens);
            o.addProperty("threads", Integer.getInteger("ai.djl.pytorch.num_threads", -1));
            o.addProperty("load_seconds", loadSeconds);
            o.addProperty("prefill_seconds", seconds[0]);
            o.addProperty("decode_seconds", seconds[1]);
            o.addProperty("tokens_per_second", (newTokens - 1) / seconds[1]);
            System.out.println(o);
        }
    }

    /** The prompt ids the worker uses for {@code seed} (the first random draws of its timed session). */
    public static long[] promptIds(long seed, int prompt, int vocab) {
        SplittableRandom random = new SplittableRandom(seed);
        long[] ids = new long[prompt];
        for (int i = 0; i < prompt; i++) {
            ids[i] = random.nextInt(vocab);
        }
        return ids;
    }
}
