package ai.djl.memopt.examples.bench;

import ai.djl.Device;
import ai.djl.engine.Engine;
import ai.djl.memopt.finetune.DataParallelFineTuner;
import ai.djl.memopt.finetune.FineTuner;
import ai.djl.memopt.finetune.StateBytes;
import ai.djl.memopt.finetune.StatefulOptimizer;
import ai.djl.memopt.finetune.StepResult;
import ai.djl.memopt.finetune.TokenBatch;
import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.lora.LoraReport;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.memory.NativeMemory;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.FusedAttention;
import ai.djl.memopt.nn.HostReads;
import ai.djl.memopt.nn.PhaseTimer;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.quantize.StreamingQuantizedLoader;
import ai.djl.ndarray.NDManager;
import java.nio.file.Path;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonObject;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.function.Function;
import java.util.HashMap;
import java.util.Locale;
import java.util.Map;
import java.util.SplittableRandom;

/**
 * One training-memory measurement, run by {@code memopt bench train} in a fresh JVM (so {@code VmHWM} is this
 * configuration's own peak): builds a preset with seeded random FP32 weights and a {@link FineTuner} in the given mode,
 * measures the idle memory, runs {@code steps} steps on seeded random token batches and prints one JSON line.
 *
 * <p>Arguments: {@code preset mode batch seq steps device seed lossChunkTokens checkpointSpec [modelDir]}; device is
 * {@code cpu}, {@code gpuN} or a comma list of them, for data parallel ({@link DataParallelFineTuner}) with
 * {@code batch} rows per device; mode is
 * {@code fp32}, {@code checkpoint}, {@code fp16}, {@code fp16+checkpoint} or {@code qlora}; the checkpointed modes
 * (all but {@code fp32} and {@code fp16}) checkpoint the decoder layers by {@code checkpointSpec}
 * ({@link FineTuner#checkpointPolicy}), or by the mode's own default ({@link #modes()}) when it is {@code default}.
 * With {@code modelDir} (qlora only) the base is a Hugging Face checkpoint read by {@link StreamingQuantizedLoader}
 * straight into int4 instead of a random FP32 preset quantized in memory, so models far larger than memory in FP32
 * (DeepSeek-V2-Lite) can be measured.
 *
 * <p>Memory: on CPU the peak is the process's {@code VmHWM} at the end and the idle figure its {@code VmRSS} right
 * before the first step (after a GC, with model and optimizer built); on a GPU both are device memory in use, the peak
 * sampled every millisecond during the steps. {@code activation_bytes = peak - idle - (state after - state at idle)}:
 * what the steps needed beyond the state that exists afterwards (gradients, optimizer moments are allocated at the
 * first step), i.e. activations, autograd buffers and per-step temporaries.
 */
public final class TrainBenchWorker {

    private TrainBenchWorker() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 9 && args.length != 10) {
            System.err.println("usage: TrainBenchWorker preset mode batch seq steps cpu|gpu seed loss-chunk-tokens"
                    + " checkpoint-spec [modelDir]");
            System.exit(2);
        }
        String preset = args[0];
        String mode = args[1];
        int batch = Integer.parseInt(args[2]);
        int seq = Integer.parseInt(args[3]);
        int steps = Integer.parseInt(args[4]);
        List<Device> devices = devices(args[5]);
        Device device = devices.get(0);
        long seed = Long.parseLong(args[6]);
        int lossChunk = Integer.parseInt(args[7]);
        Map<String, String> m = modes(device.isGpu()).get(mode);
        if (m == null) {
            throw new IllegalArgumentException("unknown mode " + mode);
        }
        String checkpointing = "none".equals(m.get("checkpoint")) || "default".equals(args[8])
                ? m.get("checkpoint") : args[8];
        Path modelDir = args.length == 10 ? Path.of(args[9]) : null;
        if (modelDir != null && !"qlora".equals(mode)) {
            throw new IllegalArgumentException("a model directory is only loaded in qlora mode, not " + mode);
        }
        Engine.getInstance().setRandomSeed((int) seed);
        NDManager loadManager = modelDir == null ? null : NDManager.newBaseManager(device);
        DeepSeekForCausalLM base;
        Qlora qlora;
        double loadSeconds = Double.NaN;
        if (modelDir != null) {
            long t0 = System.nanoTime();
            base = StreamingQuantizedLoader.load(modelDir, loadManager, DataType.FLOAT32, Qlora.QUANTIZATION).model();
            loadSeconds = (System.nanoTime() - t0) / 1e9;
            qlora = Qlora.adaptLoaded(base);
        } else {
            DeepSeekConfig presetConfig = DeepSeekConfig.preset(preset);
            base = DeepSeekForCausalLM.random(presetConfig, seed, device, DataType.FLOAT32);
            qlora = "qlora".equals(mode) ? Qlora.apply(base) : null;
        }
        DeepSeekConfig config = base.config();
        if (devices.size() > 1 && modelDir != null) {
            throw new IllegalArgumentException("data-parallel runs build --preset on each device; --model is not"
                    + " replicated");
        }
        // one replica per further device: the same preset and seed, decorated the same way (data parallel)
        List<DeepSeekForCausalLM> replicas = new ArrayList<>(List.of(base));
        for (Device d : devices.subList(1, devices.size())) {
            DeepSeekForCausalLM r = DeepSeekForCausalLM.random(config, seed, d, DataType.FLOAT32);
            if (qlora != null) {
                Qlora.apply(r);
            }
            replicas.add(r);
        }
        FineTuner.Builder settings = FineTuner.builder().optCheckpointing(checkpointing)
                .optPrecision(FineTuner.Precision.parse(m.get("precision"))).optLearningRate(1e-4f)
                .optLossChunkTokens(lossChunk).optSeed(seed)
                .optOptimizer(StatefulOptimizer.Kind.parse(System.getProperty(OPTIMIZER_PROPERTY, "adamw")))
                .optFusedUpdate(Boolean.getBoolean(FUSED_PROPERTY))
                .optOffloadOptimizer(Boolean.getBoolean(OFFLOAD_PROPERTY));
        DataParallelFineTuner dp = replicas.size() > 1 ? DataParallelFineTuner.create(settings, replicas) : null;
        Function<TokenBatch, StepResult> stepper;
        try (NDManager owned = loadManager;
                Replicas models = new Replicas(replicas);
                FineTuner tuner = dp != null ? dp.primary() : settings.setModel(base).build();
                DataParallelFineTuner parallel = dp) {
            stepper = dp != null ? dp::step : tuner::step;
            int rows = batch * devices.size(); // --batch rows per device
            SplittableRandom random = new SplittableRandom(seed);
            // packed int4 weights are not parameters: count them with the state
            long quantizedBytes = qlora != null ? qlora.quantizedBytes : 0;
            StateBytes idleState = tuner.stateBytes();
            long initPeak = MemoryStats.peakResidentBytes();
            long idle = idleBytes(device);
            // a loaded model's peak so far is the load's: reset it so the peak below is the training steps' own
            boolean peakReset = modelDir != null && !device.isGpu() && StreamLoadWorker.resetPeak();
            PeakSampler sampler = device.isGpu() ? new PeakSampler(device) : null;
            double[] seconds = new double[steps];
            double firstLoss = Double.NaN;
            double lastLoss = Double.NaN;
            int skipped = 0;
            for (int s = 0; s < steps; s++) {
                TokenBatch tokens = randomBatch(random, config, rows, seq);
                long t0 = System.nanoTime();
                StepResult r = stepper.apply(tokens);
                seconds[s] = (System.nanoTime() - t0) / 1e9;
                if (s == 0) {
                    firstLoss = r.loss();
                }
                lastLoss = r.loss();
                skipped += r.skipped() ? 1 : 0;
                System.err.printf(Locale.ROOT, "bench train %s: step %d/%d %.2f s loss %.4f%n", mode, s + 1, steps,
                        seconds[s], r.loss());
            }
            long peak = sampler != null ? sampler.stop() : MemoryStats.peakResidentBytes();
            JsonObject profile = PROFILE ? profile(tuner, random, config, batch, seq, base.manager()) : null;
            StateBytes state = tuner.stateBytes();
            double[] sorted = seconds.clone();
            Arrays.sort(sorted);
            double median = steps % 2 == 1 ? sorted[steps / 2] : (sorted[steps / 2 - 1] + sorted[steps / 2]) / 2;
            JsonObject o = new JsonObject();
            o.addProperty("preset", modelDir != null ? modelDir.getFileName().toString() : preset);
            if (modelDir != null) {
                o.addProperty("model", modelDir.toString());
                o.addProperty("load_seconds", loadSeconds);
            }
            o.addProperty("mode", mode);
            o.addProperty("checkpointing", tuner.checkpointing());
            o.addProperty("batch", batch);
            o.addProperty("seq", seq);
            o.addProperty("steps", steps);
            o.addProperty("loss_chunk_tokens", lossChunk);
            o.addProperty("attention_kernel", FusedAttention.enabled(device) ? "fused" : "eager");
            o.addProperty("device", args[5]);
            o.addProperty("replicas", devices.size());
            o.addProperty("tokens_per_second", (double) rows * seq / median);
            o.addProperty("peak_memory_bytes", peak);
            o.addProperty("idle_memory_bytes", idle);
            o.addProperty("state_bytes", state.total() + quantizedBytes);
            o.addProperty("state_device_bytes", state.deviceBytes() + quantizedBytes); // the packed weights too
            o.addProperty("state_host_bytes", state.hostBytes());
            o.addProperty("optimizer", tuner.optimizer().kind().name().toLowerCase(Locale.ROOT));
            o.addProperty("fused_update", tuner.fusedUpdate());
            o.addProperty("offload_optimizer", tuner.offloadedOptimizer());
            o.addProperty("weights_bytes", state.weights() + quantizedBytes);
            o.addProperty("quantized_weight_bytes", quantizedBytes);
            o.addProperty("trainable_parameters", qlora != null ? qlora.trainable : config.parameterCount());
            o.addProperty("master_bytes", state.masters());
            o.addProperty("gradient_bytes", state.gradients());
            o.addProperty("optimizer_bytes", state.optimizer());
            o.addProperty("activation_bytes", peak - idle - (state.total() - idleState.total()));
            o.addProperty("median_step_seconds", median);
            o.addProperty("init_peak_bytes", initPeak);
            if (modelDir != null) {
                o.addProperty("peak_reset_after_load", peakReset);
            }
            o.addProperty("first_loss", firstLoss);
            o.addProperty("last_loss", lastLoss);
            o.addProperty("skipped_steps", skipped);
            o.addProperty("parameters", config.parameterCount());
            if (profile != null) {
                o.add("profile", profile);
            }
            System.out.println(o);
        }
    }

    /** {@code cpu}, {@code gpu}, {@code gpuN} or a comma list of them (data parallel over the list). */
    static List<Device> devices(String list) {
        List<Device> out = new ArrayList<>();
        for (String d : list.split(",")) {
            String n = d.trim().toLowerCase(Locale.ROOT);
            out.add(n.equals("cpu") ? Device.cpu() : Device.gpu(n.equals("gpu") ? 0 : Integer.parseInt(
                    n.substring(n.charAt(3) == ':' ? 4 : 3))));
        }
        return out;
    }

    /** Closes the replicas' models. */
    private static final class Replicas implements AutoCloseable {
        private final List<DeepSeekForCausalLM> models;

        Replicas(List<DeepSeekForCausalLM> models) {
            this.models = models;
        }

        @Override
        public void close() {
            models.forEach(DeepSeekForCausalLM::close);
        }
    }

    /** The system property that asks the worker for a profile. */
    public static final String PROFILE_PROPERTY = "memopt.profile";
    /** Whether to time the phases of extra steps ({@code memopt bench train --profile}). */
    static final boolean PROFILE = Boolean.getBoolean(PROFILE_PROPERTY);
    /** System properties of the optimizer choices ({@code bench train --optimizer, --fused-update, --offload-optimizer}). */
    public static final String OPTIMIZER_PROPERTY = "memopt.optimizer";
    public static final String FUSED_PROPERTY = "memopt.fusedUpdate";
    public static final String OFFLOAD_PROPERTY = "memopt.offloadOptimizer";
    /** Extra steps timed phase by phase after the measured ones; their mean is reported. */
    public static final int PROFILED_STEPS = 2;

    /**
     * Runs {@link #PROFILED_STEPS} more steps with a {@link PhaseTimer} (the device waited for at every phase
     * boundary, so these steps are slower and are not in the step-time figures) and returns the mean seconds of each
     * phase per step, the mean wall time of a profiled step, and the host reads per step.
     */
    static JsonObject profile(FineTuner tuner, SplittableRandom random, DeepSeekConfig config, int batch, int seq,
            NDManager manager) {
        Map<String, Double> sums = new java.util.LinkedHashMap<>();
        double wall = 0;
        long reads = 0;
        for (int s = 0; s < PROFILED_STEPS; s++) {
            TokenBatch tokens = randomBatch(random, config, batch, seq);
            long readsBefore = HostReads.count();
            PhaseTimer timer = PhaseTimer.start(manager);
            long t0 = System.nanoTime();
            tuner.step(tokens);
            Map<String, Double> phases = timer.stop();
            wall += (System.nanoTime() - t0) / 1e9;
            reads += HostReads.count() - readsBefore;
            phases.forEach((k, v) -> sums.merge(k, v, Double::sum));
        }
        JsonObject o = new JsonObject();
        JsonObject seconds = new JsonObject();
        sums.forEach((k, v) -> seconds.addProperty(k, v / PROFILED_STEPS));
        o.add("phase_seconds", seconds);
        o.addProperty("step_seconds", wall / PROFILED_STEPS);
        o.addProperty("host_reads_per_step", (double) reads / PROFILED_STEPS);
        o.addProperty("steps", PROFILED_STEPS);
        return o;
    }

    /** A batch of {@code batch x seq} random token ids. */
    static TokenBatch randomBatch(SplittableRandom random, DeepSeekConfig config, int batch, int seq) {
        long[] ids = new long[batch * seq];
        for (int i = 0; i < ids.length; i++) {
            ids[i] = random.nextInt(config.vocabSize());
        }
        return new TokenBatch(ids, batch, seq);
    }

    /**
     * The smallest of 40 readings about 25 ms apart, with GCs and {@link NativeMemory#releaseFreed()} between them: a
     * single reading right after the GCs sometimes caught tens of MB of memory about to be freed (the same model and
     * seed read 1,393 and 1,440 MB), which then came off the activation figure.
     */
    static long idleBytes(Device device) throws InterruptedException {
        long min = Long.MAX_VALUE;
        for (int i = 0; i < 40; i++) {
            if (i % 10 == 0) {
                System.gc(); // direct buffers of the set-up are freed by their cleaners after a GC
                Thread.sleep(50);
            }
            NativeMemory.releaseFreed(); // as the tuner does after every step
            min = Math.min(min, MemoryStats.deviceBytesInUse(device));
            Thread.sleep(25);
        }
        return min;
    }

    /**
     * The benchmark modes: checkpoint spec and precision of each. Both checkpointed modes nest the attention and MLP
     * checkpoints inside each layer's ({@code nested}); {@code fp16+checkpoint}, the memory-lean mode, nests the routed
     * experts too, which makes it slower (the issue bounds the step time of {@code checkpoint} only).
     */
    public static Map<String, Map<String, String>> modes() {
        return modes(false);
    }

    /**
     * The modes on a CPU or a GPU. On a GPU both checkpointed modes recompute whole layers ({@code all}): there every
     * nested level is another forward of its blocks with its kernel launches, while the activation memory it saves is
     * small next to the state and the runtime's own memory (bench-small, B=4, T=1024, H100: {@code checkpoint} 0.41 s
     * a step with {@code all}, 0.58 s with {@code nested}).
     */
    public static Map<String, Map<String, String>> modes(boolean gpu) {
        Map<String, Map<String, String>> m = new HashMap<>();
        m.put("fp32", Map.of("checkpoint", "none", "precision", "fp32"));
        m.put("checkpoint", Map.of("checkpoint", gpu ? "all" : "nested", "precision", "fp32"));
        m.put("fp16", Map.of("checkpoint", "none", "precision", "fp16"));
        m.put("fp16+checkpoint", Map.of("checkpoint", gpu ? "all" : "nested+experts", "precision", "fp16"));
        m.put("qlora", Map.of("checkpoint", "all", "precision", "fp32"));
        return m;
    }

    /**
     * QLoRA as Dettmers et al. run it: the base's projections (attention, dense and shared MLPs, routed experts)
     * quantized to int4 and frozen, rank-8 adapters (alpha 16) on the attention and MLP projections, trained in FP32.
     */
    static final class Qlora {
        static final String[] TARGETS = {"q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"};
        /** The dense and shared-expert MLPs (as target_parameters: PEFT reads the names as the routed experts). */
        static final String[] MLP = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"};
        final long quantizedBytes;
        final long trainable;

        private Qlora(long quantizedBytes, long trainable) {
            this.quantizedBytes = quantizedBytes;
            this.trainable = trainable;
        }

        static final QuantizationConfig QUANTIZATION = Int4WeightOnlyConfig.builder().optGroupSize(64).build();

        static Qlora apply(DeepSeekForCausalLM lm) {
            QuantizationReport q = Quantizer.quantize(lm, QUANTIZATION);
            LoraReport l = Lora.apply(lm, LoraConfig.builder().setRank(8).optAlpha(16).optTargetModules(TARGETS)
                    .optTargetParameters(MLP).build());
            return new Qlora(q.bytesAfter(), l.trainableParameters());
        }

        /** The adapters on a model the streaming loader already quantized with {@link #QUANTIZATION}. */
        static Qlora adaptLoaded(DeepSeekForCausalLM lm) {
            long packed = QuantBenchWorker.quantizedBytes(lm);
            LoraReport l = Lora.apply(lm, LoraConfig.builder().setRank(8).optAlpha(16).optTargetModules(TARGETS)
                    .optTargetParameters(MLP).build());
            return new Qlora(packed, l.trainableParameters());
        }
    }

    /** Samples device memory in use on a background thread; {@link #stop()} returns the maximum seen. */
    static final class PeakSampler {
        private final Thread thread;
        private volatile boolean running = true;
        private volatile long peak;

        PeakSampler(Device device) {
            peak = MemoryStats.deviceBytesInUse(device);
            thread = new Thread(() -> {
                while (running) {
                    peak = Math.max(peak, MemoryStats.deviceBytesInUse(device));
                    try {
                        Thread.sleep(1);
                    } catch (InterruptedException e) {
                        return;
                    }
                }
            }, "device-memory-sampler");
            thread.setDaemon(true);
            thread.start();
        }

        long stop() throws InterruptedException {
            running = false;
            thread.join();
            return peak;
        }
    }
}
