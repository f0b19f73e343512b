package ai.djl.memopt.examples.bench;

import ai.djl.Device;
import ai.djl.engine.Engine;
import ai.djl.memopt.inference.MlaCachedDecoder;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.gson.JsonObject;
import java.util.Locale;
import java.util.SplittableRandom;

/**
 * One generation measurement, run by {@code memopt bench generate} in a fresh JVM (so {@code VmHWM} is this
 * configuration's own peak): a preset with seeded random FP32 weights decoded by {@link MlaCachedDecoder} (the
 * compressed MLA cache), a batch of seeded random prompts, greedy decoding; prints one JSON line.
 *
 * <p>Arguments: {@code preset batch promptTokens newTokens device seed prefillChunk}.
 *
 * <p>Timing: a short warm-up session first (a few tokens, so one-off engine initialisation is not timed); then the
 * prefill over the prompt in calls of {@code (B, prefillChunk)} tokens (as {@code Generator} does; the last yields the
 * first new token), then
 * {@code newTokens - 1} single-token decode steps. {@code tokens_per_second = B x (newTokens - 1) / decode seconds};
 * the prefill is reported separately ({@code prefill_seconds}, {@code prefill_tokens_per_second = B x P / seconds}).
 *
 * <p>Cache: {@code cache_bytes_per_token = (kv_lora_rank + qk_rope_head_dim) x layers x element bytes} from
 * {@link MlaCachedDecoder#cacheBytesPerToken()}; {@code hf_cache_bytes_per_token} is what a Hugging Face-style cache
 * of per-head keys and values would hold, {@code heads x (qk_head_dim + v_head_dim) x layers x element bytes}.
 * {@code cache_bytes} is what the session actually allocated ({@code B x (P + N)} tokens).
 */
public final class GenerateBenchWorker {

    private static final int WARMUP_PROMPT = 8;
    private static final int WARMUP_NEW = 3;

    private GenerateBenchWorker() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 7 && args.length != 8) {
            System.err.println("usage: GenerateBenchWorker preset batch promptTokens newTokens cpu|gpu seed "
                    + "prefillChunk [fp32|fp16]");
            System.exit(2);
        }
        String preset = args[0];
        int batch = Integer.parseInt(args[1]);
        int prompt = Integer.parseInt(args[2]);
        int newTokens = Integer.parseInt(args[3]);
        Device device = "gpu".equals(args[4]) ? Device.gpu() : Device.cpu();
        long seed = Long.parseLong(args[5]);
        int chunk = Integer.parseInt(args[6]);
        DataType dtype = args.length == 8 && "fp16".equals(args[7]) ? DataType.FLOAT16 : DataType.FLOAT32;
        System.out.println(run(preset, batch, prompt, newTokens, device, seed, chunk, dtype));
    }

    /** Runs one configuration in this JVM (the peak memory figure is then the process's, whatever ran before). */
    public static JsonObject run(String preset, int batch, int prompt, int newTokens, Device device, long seed,
            int chunk) {
        return run(preset, batch, prompt, newTokens, device, seed, chunk, DataType.FLOAT32);
    }

    /** As above with the model's weights in {@code dtype} (FLOAT32 or FLOAT16). */
    public static JsonObject run(String preset, int batch, int prompt, int newTokens, Device device, long seed,
            int chunk, DataType dtype) {
        if (chunk < 1) {
            throw new IllegalArgumentException("prefill chunk must be >= 1, got " + chunk);
        }
        DeepSeekConfig config = DeepSeekConfig.preset(preset);
        Engine.getInstance().setRandomSeed((int) seed);
        try (DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(config, seed, device, dtype);
                NDManager manager = NDManager.newBaseManager(device)) {
            MlaCachedDecoder decoder = new MlaCachedDecoder(lm, device);
            SplittableRandom random = new SplittableRandom(seed);
            // warmed up at the measured batch: the TorchScript step's graph executor specialises on the shapes it saw
            decode(decoder, manager, config, random, batch, WARMUP_PROMPT, WARMUP_NEW, WARMUP_PROMPT, null);
            for (int i = 0; i < 3; i++) {
                System.gc();
            }
            long idle = MemoryStats.deviceBytesInUse(device);
            TrainBenchWorker.PeakSampler sampler = device.isGpu() ? new TrainBenchWorker.PeakSampler(device) : null;
            double[] seconds = new double[2];
            long cacheBytes = decode(decoder, manager, config, random, batch, prompt, newTokens, chunk,
                    seconds);
            long peak;
            try {
                peak = sampler != null ? sampler.stop() : MemoryStats.peakResidentBytes();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new IllegalStateException("interrupted while sampling device memory", e);
            }
            int elementBytes = dtype.getNumOfBytes();
            int layers = config.numHiddenLayers();
            JsonObject o = new JsonObject();
            o.addProperty("preset", preset);
            o.addProperty("batch", batch);
            o.addProperty("prompt_tokens", prompt);
            o.addProperty("new_tokens", newTokens);
            o.addProperty("device", device.isGpu() ? "gpu" + device.getDeviceId() : "cpu");
            o.addProperty("dtype", dtype == DataType.FLOAT16 ? "float16" : "float32");
            o.addProperty("expert_dispatch", decoder.expertDispatch().name().toLowerCase(java.util.Locale.ROOT));
            // which path this batch's session ran: torchscript (one scripted call per stage and step) or java (the
            // decoder's path, or DecodePath.AUTO's batch policy on a GPU)
            o.addProperty("decode_path", decoder.decodePath(batch).name().toLowerCase(java.util.Locale.ROOT));
            if (decoder.javaPathReason(batch) != null) {
                o.addProperty("decode_path_reason", decoder.javaPathReason(batch));
            }
            o.addProperty("script_max_batch", decoder.scriptMaxBatch());
            o.addProperty("prefill_chunk", Math.min(chunk, prompt));
            o.addProperty("prefill_seconds", seconds[0]);
            o.addProperty("prefill_tokens_per_second", batch * (double) prompt / seconds[0]);
            o.addProperty("decode_seconds", seconds[1]);
            o.addProperty("tokens_per_second", newTokens > 1 ? batch * (double) (newTokens - 1) / seconds[1] : 0.0);
            o.addProperty("cache_bytes_per_token", decoder.cacheBytesPerToken());
            o.addProperty("hf_cache_bytes_per_token",
                    (long) MlaCachedDecoder.perHeadCacheValuesPerTokenPerLayer(config) * layers * elementBytes);
            o.addProperty("cache_values_per_token_per_layer", MlaCachedDecoder.cacheValuesPerTokenPerLayer(config));
            o.addProperty("hf_cache_values_per_token_per_layer",
                    MlaCachedDecoder.perHeadCacheValuesPerTokenPerLayer(config));
            o.addProperty("cache_bytes", cacheBytes);
            o.addProperty("peak_memory_bytes", peak);
            o.addProperty("idle_memory_bytes", idle);
            o.addProperty("parameters", config.parameterCount());
            o.addProperty("layers", layers);
            return o;
        }
    }

    /**
     * Greedy decoding of {@code batch} random prompts; {@code seconds} (if not null) receives the prefill and decode
     * times. Returns the session's cache bytes. Every per-step array lives in a scope closed at the end of the step.
     */
    static long decode(MlaCachedDecoder decoder, NDManager manager, DeepSeekConfig config,
            SplittableRandom random, int batch, int prompt, int newTokens, int chunk, double[] seconds) {
        int total = prompt + newTokens;
        long[] ids = new long[batch * prompt];
        for (int i = 0; i < ids.length; i++) {
            ids[i] = random.nextInt(config.vocabSize());
        }
        try (MlaCachedDecoder.Session session = decoder.newSession(manager, batch, total)) {
            NDArray next = null;
            long t0 = System.nanoTime();
            for (int from = 0; from < prompt; from += chunk) {
                int to = Math.min(prompt, from + chunk);
                int t = to - from;
                try (NDManager step = manager.newSubManager()) {
                    long[] part = new long[batch * t];
                    long[] pos = new long[batch * t];
                    for (int b = 0; b < batch; b++) {
                        for (int i = 0; i < t; i++) {
                            part[b * t + i] = ids[b * prompt + from + i];
                            pos[b * t + i] = from + i;
                        }
                    }
                    NDArray input = step.create(part, new Shape(batch, t)); // (B, t)
                    NDArray positions = step.create(pos, new Shape(batch, t)); // (B, t)
                    NDArray mask = step.ones(new Shape(batch, to), DataType.INT64); // (B, past + t)
                    NDArray logits = session.next(input, positions, mask); // (B, V)
                    if (to == prompt) {
                        next = logits.argMax(1).reshape(batch, 1); // (B, 1)
                        next.toLongArray(); // wait for the result: the prefill is done
                        next.attach(manager);
                    }
                }
            }
            long t1 = System.nanoTime();
            for (int s = 1; s < newTokens; s++) {
                try (NDManager step = manager.newSubManager()) {
                    next.attach(step);
                    int length = prompt + s;
                    NDArray positions = step.full(new Shape(batch, 1), length - 1, DataType.INT64); // (B, 1)
                    NDArray mask = step.ones(new Shape(batch, length), DataType.INT64); // (B, past + 1)
                    NDArray logits = session.next(next, positions, mask); // (B, V)
                    next = logits.argMax(1).reshape(batch, 1); // (B, 1)
                    next.toLongArray(); // the sampled token goes back to the host in a real decoder too
                    next.attach(manager);
                }
            }
            long t2 = System.nanoTime();
            next.close();
            if (seconds != null) {
                seconds[0] = (t1 - t0) / 1e9;
                seconds[1] = (t2 - t1) / 1e9;
                System.err.printf(Locale.ROOT, "bench generate batch %d: prefill %.2f s, %d decode steps %.2f s%n",
                        batch, seconds[0], newTokens - 1, seconds[1]);
            }
            return session.cacheBytes();
        }
    }
}
