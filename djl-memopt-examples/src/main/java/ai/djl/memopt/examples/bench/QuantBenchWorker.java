package ai.djl.memopt.examples.bench;

import ai.djl.Device;
import ai.djl.memopt.examples.cli.PerplexityCommand;
import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.Calibration;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.LayerOverride;
import ai.djl.memopt.quantize.QuantMethod;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Locale;
import java.util.stream.Stream;

/**
 * One quantization-quality measurement, run by {@code memopt bench quant} in a fresh JVM: loads a model directory in
 * FP32, quantizes it in memory with one variant, exports the artifact (for its size on disk), and scores the held-out
 * text in consecutive windows with the in-memory model; prints one JSON line.
 *
 * <p>Variants: {@code fp32} (the baseline, not quantized), {@code int8} (per-channel RTN), {@code int4} (group-wise RTN),
 * {@code int4-awq}, {@code int4-gptq} (group-wise with calibration).
 *
 * <p>Arguments: {@code modelDir variant heldoutFile calibrationFile|- groupSize seq|0 includeLmHead workDir
 * calibrationSamples calibrationSeqLen embeddings}, {@code embeddings} one of {@code -} (float table), {@code same}
 * (the variant's scheme), {@code int8}, {@code int4}. {@code seq 0} means {@code min(max_position_embeddings, 1024)}, as
 * {@code memopt perplexity}. The artifact goes to {@code workDir/variant} (replaced if it is an earlier artifact).
 *
 * <p>Sizes: {@code weight_bytes} sums the arrays the model holds after quantization (float parameters, plus packed
 * data, scales and zero points of every {@link QuantizedLinear} and {@link QuantizedEmbedding}); {@code quantized_layers_bytes_before/after} are the
 * same over the quantized layers only (from the {@link QuantizationReport}); {@code artifact_bytes} is the size of
 * the weight files on disk (the source checkpoint's for fp32).
 */
public final class QuantBenchWorker {

    public static final List<String> VARIANTS = List.of("fp32", "int8", "int4", "int4-awq", "int4-gptq");

    private QuantBenchWorker() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 11) {
            System.err.println("usage: QuantBenchWorker modelDir variant heldout calibration|- groupSize seq|0 "
                    + "includeLmHead workDir calibrationSamples calibrationSeqLen embeddings(-|int8|int4|same)");
            System.exit(2);
        }
        Path model = Path.of(args[0]);
        String variant = args[1];
        Path heldout = Path.of(args[2]);
        Path calibration = "-".equals(args[3]) ? null : Path.of(args[3]);
        int groupSize = Integer.parseInt(args[4]);
        int seq = Integer.parseInt(args[5]);
        boolean includeLmHead = Boolean.parseBoolean(args[6]);
        Path work = Path.of(args[7]);
        int samples = Integer.parseInt(args[8]);
        int sampleLen = Integer.parseInt(args[9]);
        String embeddings = "-".equals(args[10]) ? null : args[10];
        System.out.println(run(model, variant, heldout, calibration, groupSize, seq, includeLmHead, embeddings, work,
                samples, sampleLen));
    }

    /** {@link #run(Path, String, Path, Path, int, int, boolean, String, Path, int, int)} with a float embedding. */
    public static JsonObject run(Path model, String variant, Path heldout, Path calibration, int groupSize, int seq,
            boolean includeLmHead, Path work, int samples, int sampleLen) throws IOException {
        return run(model, variant, heldout, calibration, groupSize, seq, includeLmHead, null, work, samples,
                sampleLen);
    }

    /**
     * Runs one variant in this JVM.
     *
     * @param embeddings null to keep the token embedding in float; {@code same} to quantize it with the variant's
     *     scheme; {@code int8} or {@code int4} for that scheme (RTN in every case)
     */
    public static JsonObject run(Path model, String variant, Path heldout, Path calibration, int groupSize, int seq,
            boolean includeLmHead, String embeddings, Path work, int samples, int sampleLen) throws IOException {
        if (!VARIANTS.contains(variant)) {
            throw new IllegalArgumentException("unknown variant '" + variant + "', expected one of " + VARIANTS);
        }
        long[] heldoutIds = PerplexityCommand.tokenize(model, heldout);
        JsonObject o = new JsonObject();
        o.addProperty("variant", variant);
        o.addProperty("model", model.toString());
        try (DeepSeekForCausalLM lm = DeepSeekLoader.load(model, Device.cpu(), DataType.FLOAT32)) {
            int window = seq > 0 ? seq : Math.min(lm.config().maxPositionEmbeddings(), 1024);
            long fp32Bytes = weightBytes(lm);
            QuantizationReport report = null;
            double quantSeconds = 0;
            long artifactBytes;
            if (variant.equals("fp32")) {
                artifactBytes = safetensorsBytes(model);
            } else {
                long t0 = System.nanoTime();
                try (NDManager calib = lm.manager().newSubManager()) {
                    QuantizationConfig config = config(variant, groupSize, includeLmHead, embeddings,
                            calibration == null ? null : calibrationBatches(calib, model, calibration, samples,
                                    sampleLen, lm.config().vocabSize()));
                    report = Quantizer.quantize(lm, config);
                }
                quantSeconds = (System.nanoTime() - t0) / 1e9;
                Path dir = work.resolve(variant);
                QuantizedArtifact.export(lm, dir, ExportOptions.builder().optSourceModel(model)
                        .optArchitecture(QuantizedArtifact.DEEPSEEK).build());
                artifactBytes = safetensorsBytes(dir);
                o.addProperty("artifact", dir.toString());
            }
            long weightBytes = weightBytes(lm);
            long t1 = System.nanoTime();
            PerplexityCommand.Evaluation e;
            try (PerplexityCommand.Scorer scorer = PerplexityCommand.scorerOf(lm, () -> { })) {
                for (long id : heldoutIds) {
                    if (id >= scorer.vocabSize()) {
                        throw new IllegalArgumentException("held-out token id " + id
                                + " is outside the model's vocabulary " + scorer.vocabSize());
                    }
                }
                e = PerplexityCommand.evaluate(scorer, heldoutIds, window);
            }
            double evalSeconds = (System.nanoTime() - t1) / 1e9;
            o.addProperty("group_size", variant.startsWith("int4") ? groupSize : 0);
            o.addProperty("include_lm_head", includeLmHead);
            o.addProperty("embeddings", variant.equals("fp32") || embeddings == null ? "fp32"
                    : embeddings.equals("same") ? variant.substring(0, 4) : embeddings);
            o.addProperty("calibration", calibration == null ? "" : calibration.toString());
            o.addProperty("heldout_tokens", heldoutIds.length);
            o.addProperty("seq", window);
            o.addProperty("windows", e.windows());
            o.addProperty("loss", e.loss());
            o.addProperty("perplexity", e.perplexity());
            o.addProperty("weight_bytes", weightBytes);
            o.addProperty("fp32_weight_bytes", fp32Bytes);
            o.addProperty("weight_ratio", weightBytes / (double) fp32Bytes);
            o.addProperty("artifact_bytes", artifactBytes);
            o.addProperty("quantized_layers", report == null ? 0 : report.layers().size());
            o.addProperty("quantized_layers_bytes_before", report == null ? 0 : report.bytesBefore());
            o.addProperty("quantized_layers_bytes_after", report == null ? 0 : report.bytesAfter());
            o.addProperty("quantized_layers_ratio", report == null || report.bytesBefore() == 0 ? 1.0
                    : report.bytesAfter() / (double) report.bytesBefore());
            o.addProperty("min_sqnr_db", report == null ? Double.NaN : report.minSqnrDb());
            o.addProperty("quantize_seconds", quantSeconds);
            o.addProperty("eval_seconds", evalSeconds);
            o.addProperty("peak_memory_bytes", MemoryStats.peakResidentBytes());
        }
        return o;
    }

    /** Bytes of every weight array the model holds: float parameters and the quantized layers' tensors. */
    public static long weightBytes(Block root) {
        return floatBytes(root) + quantizedBytes(root);
    }

    /** Bytes of the model's (initialized) parameters: the weights kept in float. */
    static long floatBytes(Block root) {
        long bytes = 0;
        for (Parameter p : BlockTrees.parameters(root).values()) {
            if (p.isInitialized()) {
                NDArray a = p.getArray();
                bytes += a.size() * a.getDataType().getNumOfBytes();
            }
        }
        return bytes;
    }

    /** Bytes of the quantized layers' tensors (codes, scales, zero points and biases), which are not parameters. */
    static long quantizedBytes(Block root) {
        long bytes = 0;
        for (Block b : BlockTrees.walk(root).values()) {
            if (b instanceof QuantizedLinear) {
                QuantizedLinear q = (QuantizedLinear) b;
                bytes += q.quantizedWeight().nbytes();
                bytes += q.bias().map(a -> a.size() * a.getDataType().getNumOfBytes()).orElse(0L);
            } else if (b instanceof QuantizedEmbedding) {
                bytes += ((QuantizedEmbedding) b).nbytes();
            }
        }
        return bytes;
    }

    static QuantizationConfig config(String variant, int groupSize, boolean includeLmHead, String embeddings,
            List<NDList> calibration) {
        boolean sameScheme = embeddings != null && (embeddings.equals("same") || variant.startsWith(embeddings));
        LayerOverride embeddingOverride = embeddings == null || sameScheme ? null
                : LayerOverride.use("model.embed_tokens", embeddings.equals("int8")
                        ? Int8WeightOnlyConfig.builder().build()
                        : Int4WeightOnlyConfig.builder().optGroupSize(groupSize).build());
        if (variant.equals("int8")) {
            Int8WeightOnlyConfig.Builder b = Int8WeightOnlyConfig.builder().optIncludeLmHead(includeLmHead)
                    .optIncludeEmbeddings(sameScheme);
            if (embeddingOverride != null) {
                b.addOverride(embeddingOverride);
            }
            return b.build();
        }
        Int4WeightOnlyConfig.Builder b = Int4WeightOnlyConfig.builder().optGroupSize(groupSize)
                .optIncludeLmHead(includeLmHead).optIncludeEmbeddings(sameScheme);
        if (embeddingOverride != null) {
            b.addOverride(embeddingOverride);
        }
        switch (variant) {
            case "int4":
                return b.build();
            case "int4-awq":
            case "int4-gptq":
                if (calibration == null) {
                    throw new IllegalArgumentException(variant + " needs calibration text");
                }
                return b.optMethod(variant.equals("int4-awq") ? QuantMethod.AWQ : QuantMethod.GPTQ)
                        .optCalibration(Calibration.of(calibration)).build();
            default:
                throw new IllegalArgumentException("not a quantized variant: " + variant);
        }
    }

    /** Up to {@code samples} consecutive (1, len) windows of the tokenized calibration text. */
    static List<NDList> calibrationBatches(NDManager manager, Path model, Path text, int samples, int len, int vocab)
            throws IOException {
        long[] all = PerplexityCommand.tokenize(model, text);
        List<NDList> batches = new ArrayList<>();
        for (int start = 0; start + len <= all.length && batches.size() < samples; start += len) {
            long[] ids = Arrays.copyOfRange(all, start, start + len);
            for (long id : ids) {
                if (id >= vocab) {
                    throw new IllegalArgumentException("calibration token id " + id
                            + " is outside the model's vocabulary " + vocab);
                }
            }
            batches.add(new NDList(manager.create(ids, new Shape(1, len))));
        }
        if (batches.isEmpty()) {
            throw new IllegalArgumentException(String.format(Locale.ROOT,
                    "calibration text %s has %d tokens, fewer than one sample of %d", text, all.length, len));
        }
        return batches;
    }

    private static long safetensorsBytes(Path dir) throws IOException {
        long bytes = 0;
        try (Stream<Path> s = Files.list(dir)) {
            for (Path f : (Iterable<Path>) s::iterator) {
                if (f.getFileName().toString().endsWith(".safetensors")) {
                    bytes += Files.size(f);
                }
            }
        }
        return bytes;
    }
}
