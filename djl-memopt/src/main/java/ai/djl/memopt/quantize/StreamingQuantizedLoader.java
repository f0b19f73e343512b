package ai.djl.memopt.quantize;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.Halfs;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.NonFiniteValues;
import ai.djl.memopt.safetensors.OwnedArrays;
import ai.djl.memopt.safetensors.SafetensorsFormatException;
import ai.djl.memopt.safetensors.TensorInfo;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import com.google.common.base.Preconditions;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Loads a Hugging Face DeepSeek directory (F32, F16 or BF16 safetensors, single file or sharded) straight into a
 * quantized model, never holding the full-precision weights: every Linear the config quantizes is read on its own,
 * quantized with the same round-to-nearest code as {@link Quantizer#quantize}, installed as a {@link QuantizedLinear}
 * and its float tensor freed before the next one is read. Peak host memory is the quantized model plus the weights
 * kept in float (embeddings, norms, routers, {@code lm_head} by default) plus the layer being quantized and its
 * quantization temporaries (a few times the tensor).
 *
 * <pre>{@code
 * try (NDManager manager = NDManager.newBaseManager()) {
 *     StreamingQuantizedLoader.Result r = StreamingQuantizedLoader.load(dir, manager, DataType.FLOAT16,
 *             Int4WeightOnlyConfig.builder().optGroupSize(128).build());
 *     DeepSeekForCausalLM lm = r.model();      // logits identical to DeepSeekLoader.load + Quantizer.quantize
 *     System.out.println(r.report());
 * }
 * }</pre>
 *
 * <p>The result is exactly what {@link DeepSeekLoader#load} followed by {@link Quantizer#quantize} with the same
 * config gives (same codes, scales and report), with the same checks (missing, unexpected or wrongly shaped tensors
 * are reported with file and tensor before anything is quantized; multi-token-prediction layers are skipped). Each
 * quantized tensor is converted to {@code dtype} first, as the non-streaming path holds it, so an FP16 model gets the
 * codes of its FP16 weights.
 *
 * <p>Quantized tensors are read with positional reads straight into the memory of their arrays (libtorch's own, see
 * {@link OwnedArrays}) rather than through the memory map: touched mapped pages count as resident until the mapping is
 * garbage collected, so they would not return memory between layers.
 *
 * <p>On glibc, run the JVM with {@code MALLOC_MMAP_THRESHOLD_=131072}: glibc otherwise raises its mmap threshold to
 * the size of every freed large block, so each layer's multi-MB temporaries are carved from the heap arena between
 * the small code arrays that stay, and the arena is never returned. Measured on a 158 MB F32 checkpoint (int4 g128
 * model 28 MB, fresh JVM, {@code StreamLoadMemoryTest}): peak RSS growth 30-41 MB with the setting, against 305 MB for
 * load-then-quantize; without it a 227 MB checkpoint grew by 170 MB. On a 31.4 GB BF16 checkpoint of DeepSeek-V2-Lite's
 * shape (15.7B parameters, 8 shards; {@code memopt bench load}), int4 with groups of 128 and FP32 float weights: peak
 * RSS 10.9 GB for 8.24 GB of codes and scales plus 1.69 GB of float weights, on a 23 GB machine.
 *
 * <p>Only RTN: AWQ and GPTQ weigh channels by calibration activations, which need the whole model in memory; load
 * with {@link DeepSeekLoader} and call {@link Quantizer#quantize} for those.
 */
public final class StreamingQuantizedLoader {

    private static final Logger LOG = LoggerFactory.getLogger(StreamingQuantizedLoader.class);

    private StreamingQuantizedLoader() {}

    /** The quantized model and what was quantized. */
    public static final class Result {
        private final DeepSeekForCausalLM model;
        private final QuantizationReport report;

        /** Pairs a model with its report (for callers that quantize in memory and want the same shape of result). */
        public Result(DeepSeekForCausalLM model, QuantizationReport report) {
            this.model = Preconditions.checkNotNull(model, "model");
            this.report = Preconditions.checkNotNull(report, "report");
        }

        /** The model, its quantized layers replaced by {@link QuantizedLinear}, arrays on the caller's manager. */
        public DeepSeekForCausalLM model() {
            return model;
        }

        /** What was quantized (SQNR, bytes) and what was kept and why, as {@link Quantizer#quantize} reports it. */
        public QuantizationReport report() {
            return report;
        }
    }

    /**
     * Loads and quantizes {@code dir} onto {@code manager} (the caller owns it).
     *
     * @param dtype FLOAT32 or FLOAT16, the type of the weights kept in float and of the quantized layers' outputs
     * @param config an RTN config (overrides included)
     * @throws IllegalArgumentException for a non-RTN config, a bad dtype, an invalid config.json or a missing,
     *     unexpected or wrongly shaped tensor (naming file and tensor)
     * @throws IOException if the files cannot be read or are corrupt
     */
    public static Result load(Path dir, NDManager manager, DataType dtype, QuantizationConfig config)
            throws IOException {
        Preconditions.checkNotNull(dir, "dir");
        Preconditions.checkNotNull(manager, "manager");
        Preconditions.checkNotNull(config, "config");
        Preconditions.checkArgument(dtype == DataType.FLOAT32 || dtype == DataType.FLOAT16,
                "dtype must be FLOAT32 or FLOAT16 (BF16 checkpoints are converted in Java), got %s", dtype);
        checkRtn(config);
        DeepSeekConfig modelConfig = DeepSeekLoader.readConfig(dir);
        long start = System.nanoTime();
        try (HfCheckpoint ckpt = HfCheckpoint.open(dir)) {
            // plan on an unallocated model of the same structure: the checkpoint gives each Linear's input size
            Map<String, Quantizer.Target> targets = new LinkedHashMap<>();
            Map<String, String> skipped = new LinkedHashMap<>();
            Quantizer.plan(BlockTrees.walk(new DeepSeekForCausalLM(modelConfig)), config,
                    path -> inFeatures(ckpt, path + ".weight"), targets, skipped);
            Set<String> placeholders = new HashSet<>();
            for (String path : targets.keySet()) {
                placeholders.add(path + ".weight");
            }
            // checks every tensor (names, shapes) and loads the ones kept in float; placeholders for the others
            DeepSeekForCausalLM lm = DeepSeekLoader.load(modelConfig, ckpt, manager, dtype, placeholders::contains);
            List<QuantizationReport.Layer> layers = new ArrayList<>();
            try (Reader reader = new Reader(ckpt)) {
                for (Map.Entry<String, Quantizer.Target> t : targets.entrySet()) {
                    layers.add(quantizeLayer(lm, t.getKey(), t.getValue(), reader, manager, dtype));
                }
            } catch (IOException | RuntimeException e) {
                for (Parameter p : BlockTrees.parameters(lm).values()) {
                    p.close();
                }
                BlockTrees.walk(lm).values().stream().filter(b -> b instanceof QuantizedLinear)
                        .forEach(b -> ((QuantizedLinear) b).close());
                throw e;
            }
            QuantizationReport report = new QuantizationReport(layers, skipped, 0);
            LOG.info("{}: streamed {} layers as {} in {} ms ({} -> {} bytes)", dir, layers.size(), config.describe(),
                    (System.nanoTime() - start) / 1_000_000, report.bytesBefore(), report.bytesAfter());
            return new Result(lm, report);
        }
    }

    private static void checkRtn(QuantizationConfig config) {
        String why = " needs calibration activations, so the whole model in memory: the streaming loader quantizes"
                + " each layer as it is read and supports RTN only; load with DeepSeekLoader and call"
                + " Quantizer.quantize instead";
        Preconditions.checkArgument(config.method() == QuantMethod.RTN, "method %s%s", config.method().id(), why);
        for (LayerOverride o : config.overrides()) {
            o.config().ifPresent(c -> Preconditions.checkArgument(c.method() == QuantMethod.RTN,
                    "override '%s' uses method %s, which%s", o.pattern(), c.method().id(), why));
        }
    }

    /** A Linear's input size from its checkpoint tensor; 0 when absent or not 2-D (the loader's checks reject it). */
    private static long inFeatures(HfCheckpoint ckpt, String name) {
        if (!ckpt.contains(name)) {
            return 0;
        }
        long[] shape = ckpt.info(name).shape();
        return shape.length == 2 ? shape[1] : 0;
    }

    private static QuantizationReport.Layer quantizeLayer(DeepSeekForCausalLM lm, String path, Quantizer.Target target,
            Reader reader, NDManager manager, DataType dtype) throws IOException {
        Block linear = BlockTrees.get(lm, path);
        Parameter weightParam = linear.getParameters().get("weight");
        Parameter biasParam = linear.getParameters().contains("bias") ? linear.getParameters().get("bias") : null;
        Quantizer.Quantized q;
        try (NDManager sub = manager.newSubManager()) {
            NDArray w = reader.read(path + ".weight", sub, dtype); // (out, in)
            q = Quantizer.quantizeRtn(path, w, biasParam == null ? null : biasParam.getArray(), target);
            q.linear.quantizedWeight().attach(manager);
        } // frees the float weight and every temporary before the next layer is read
        BlockTrees.replace(lm, path, old -> q.linear);
        weightParam.close(); // the 1-element placeholder
        if (biasParam != null) {
            biasParam.close();
        }
        return q.layer;
    }

    /** Positional reads of one tensor at a time straight into the memory of its array. */
    private static final class Reader implements AutoCloseable {
        private final HfCheckpoint ckpt;
        private final Map<Path, FileChannel> channels = new HashMap<>();

        Reader(HfCheckpoint ckpt) {
            this.ckpt = ckpt;
        }

        /**
         * The tensor converted to {@code dtype} as {@code SafetensorsFile.load(manager, name, dtype)} converts it, in
         * memory of its own ({@link OwnedArrays}).
         */
        NDArray read(String name, NDManager manager, DataType dtype) throws IOException {
            TensorInfo info = ckpt.info(name);
            Path file = ckpt.fileOf(name).path();
            NDArray loaded;
            switch (info.dtype()) {
                case F32:
                case F16:
                    loaded = OwnedArrays.create(manager, info.djlShape(), info.dtype().loadedAs(), (window, offset) -> {
                        readFully(file, name, info.fileOffset() + offset, window);
                        NonFiniteValues.check(file, name, info.dtype(), window.flip());
                    });
                    break;
                case BF16:
                    loaded = OwnedArrays.create(manager, info.djlShape(), DataType.FLOAT32, (window, offset) -> {
                        // read the window's 2k bytes of bf16 into its upper half, widen in place: float i (bytes
                        // 4i..4i+3) is written after bf16 i (at 2k+2i) is read and never reaches a bf16 value still
                        // to be read
                        int k = window.remaining() / 4;
                        ByteBuffer upper = window.duplicate().position(2 * k).slice().order(ByteOrder.LITTLE_ENDIAN);
                        readFully(file, name, info.fileOffset() + offset / 2, upper);
                        NonFiniteValues.check(file, name, info.dtype(), upper.flip());
                        for (int i = 0; i < k; i++) {
                            window.putFloat(4 * i, Halfs.bf16ToFloat(window.getShort(2 * k + 2 * i)));
                        }
                    });
                    break;
                default:
                    // F64 and integer weights are unusual; the mapped reader handles them
                    return ckpt.load(manager, name, dtype);
            }
            if (loaded.getDataType() == dtype) {
                return loaded;
            }
            try (NDArray ignored = loaded) {
                return loaded.toType(dtype, false);
            }
        }

        private void readFully(Path file, String name, long offset, ByteBuffer dst) throws IOException {
            FileChannel channel = channels.get(file);
            if (channel == null) {
                channel = FileChannel.open(file, StandardOpenOption.READ);
                channels.put(file, channel);
            }
            long pos = offset;
            while (dst.hasRemaining()) {
                int n = channel.read(dst, pos);
                if (n < 0) {
                    throw new SafetensorsFormatException(file + ": tensor '" + name + "' ends past the end of the"
                            + " file (truncated?) at byte " + pos);
                }
                pos += n;
            }
        }

        @Override
        public void close() throws IOException {
            IOException first = null;
            for (FileChannel c : channels.values()) {
                try {
                    c.close();
                } catch (IOException e) {
                    first = first == null ? e : first;
                }
            }
            if (first != null) {
                throw first;
            }
        }
    }
}
