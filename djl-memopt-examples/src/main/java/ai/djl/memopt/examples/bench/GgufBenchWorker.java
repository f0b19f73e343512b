package ai.djl.memopt.examples.bench;

import ai.djl.Device;
import ai.djl.engine.Engine;
import ai.djl.memopt.gguf.GgufLoader;
import ai.djl.memopt.inference.MlaCachedDecoder;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.pytorch.jni.JniUtils;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Deque;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.SplittableRandom;

/**
 * Our side of {@code memopt bench gguf}, in a fresh JVM: a GGUF file loaded as {@code --model FILE.gguf} loads it
 * (Q8_0/Q4_0 natively quantized), decoded greedily with the compressed MLA cache exactly as
 * {@link GenerateBenchWorker} times it (batch 1: a warm-up, the prefill, then {@code newTokens - 1} single-token
 * steps); prints one JSON line.
 *
 * <p>With {@code -Dmemopt.bench.profile=true} it also runs PyTorch's profiler over a few decode steps and reports the
 * operators' self time per step (where our time goes).
 *
 * <p>Arguments: {@code file.gguf promptTokens newTokens seed}; the prompt is {@code promptTokens} ids drawn from
 * {@code SplittableRandom(seed)} below the vocabulary size (the llama.cpp side gets the same ids).
 */
public final class GgufBenchWorker {

    private static final int PROFILED_STEPS = 8;

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
            if (Boolean.getBoolean("memopt.bench.profile")) {
                o.add("profile_ms_per_decode_step", profile(decoder, manager, lm, seed));
            }
            System.out.println(o);
        }
    }

    /**
     * PyTorch's profiler over {@code PROFILED_STEPS} decode steps (after a 32-token prompt): self time per operator
     * (its duration less its children's), in milliseconds per step, largest first; "(total)" sums them all.
     */
    private static JsonObject profile(MlaCachedDecoder decoder, NDManager manager, DeepSeekForCausalLM lm, long seed)
            throws Exception {
        Path trace = Files.createTempFile("memopt-profile-", ".json");
        try {
            JniUtils.startProfile(false, false, false);
            GenerateBenchWorker.decode(decoder, manager, lm.config(), new SplittableRandom(seed + 2), 1, 32,
                    PROFILED_STEPS + 1, 32, null);
            JniUtils.stopProfile(trace.toString());
            JsonElement root = JsonParser.parseString(Files.readString(trace)); // an array, or {"traceEvents": [...]}
            JsonArray events = root.isJsonArray() ? root.getAsJsonArray()
                    : root.getAsJsonObject().getAsJsonArray("traceEvents");
            Map<Long, List<double[]>> byThread = new HashMap<>(); // (start, duration, name index)
            List<String> names = new ArrayList<>();
            Map<String, Integer> index = new HashMap<>();
            for (JsonElement e : events) {
                JsonObject ev = e.getAsJsonObject();
                if (!"X".equals(ev.has("ph") ? ev.get("ph").getAsString() : "") || !ev.has("dur")) {
                    continue;
                }
                String name = ev.get("name").getAsString();
                int id = index.computeIfAbsent(name, n -> {
                    names.add(n);
                    return names.size() - 1;
                });
                long tid = ev.has("tid") ? ev.get("tid").getAsLong() : 0;
                byThread.computeIfAbsent(tid, t -> new ArrayList<>()).add(new double[] {ev.get("ts").getAsDouble(),
                    ev.get("dur").getAsDouble(), id});
            }
            double[] self = new double[names.size()];
            for (List<double[]> list : byThread.values()) {
                list.sort((a, b) -> a[0] != b[0] ? Double.compare(a[0], b[0]) : Double.compare(b[1], a[1]));
                Deque<double[]> stack = new ArrayDeque<>(); // (end, name index)
                for (double[] ev : list) {
                    while (!stack.isEmpty() && stack.peek()[0] <= ev[0]) {
                        stack.pop();
                    }
                    self[(int) ev[2]] += ev[1];
                    if (!stack.isEmpty()) {
                        self[(int) stack.peek()[1]] -= ev[1];
                    }
                    stack.push(new double[] {ev[0] + ev[1], ev[2]});
                }
            }
            Integer[] order = new Integer[names.size()];
            double total = 0;
            for (int i = 0; i < order.length; i++) {
                order[i] = i;
                total += self[i];
            }
            Arrays.sort(order, (a, b) -> Double.compare(self[b], self[a]));
            JsonObject out = new JsonObject();
            out.addProperty("(total)", total / 1000 / PROFILED_STEPS);
            for (int i = 0; i < Math.min(15, order.length); i++) {
                out.addProperty(names.get(order[i]), self[order[i]] / 1000 / PROFILED_STEPS);
            }
            return out;
        } finally {
            Files.deleteIfExists(trace);
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
