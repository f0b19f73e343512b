package ai.djl.memopt.quantize;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.BlockSite;
import ai.djl.memopt.nn.Blocks;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import com.google.common.base.Preconditions;
import java.util.ArrayList;
import java.util.Collections;
import java.util.IdentityHashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
import java.util.function.LongSupplier;
import java.util.function.Supplier;
import java.util.function.ToLongFunction;

/**
 * The quantization entry point, in the spirit of torchao's {@code quantize_(model, config)}: replaces the selected
 * {@link Linear} layers of any DJL block tree in place by {@link QuantizedLinear} decorators and frees their float
 * weights.
 *
 * <pre>{@code
 * QuantizationReport report = Quantizer.quantize(model, Int4WeightOnlyConfig.builder().optGroupSize(128).build());
 * System.out.println(report);
 * }</pre>
 *
 * <p>The block must be initialized. Layers are quantized one at a time, so peak memory grows by one layer's
 * temporaries. A weight {@link Parameter} shared with a block that stays (tied embeddings) is not freed.
 *
 * <p>AWQ and GPTQ layers are calibrated by running the config's {@link Calibration} batches through {@code root}
 * with temporary recording decorators on those layers: as many layers (in tree order) as fit the calibration's
 * recording budget per pass, quantized right after their pass, so later passes see the earlier layers quantized, as
 * in the methods' layer-by-layer procedures. A layer that no calibration row reaches (an unused routed expert) is
 * quantized with RTN and the report says so.
 *
 * <p>Embedding tables (the DeepSeek {@code TokenEmbedding}, DJL's {@code Embedding}) stay in full precision unless
 * {@link QuantizationConfig#includeEmbeddings()} is set or a {@link LayerOverride} names them; then they are replaced
 * by {@link QuantizedEmbedding} (round to nearest, row by row in chunks, before the Linear layers so that calibration
 * sees them quantized). A table tied to the output projection ({@code tie_word_embeddings}) is never quantized.
 *
 * <p>Layers are found through {@link Blocks#sites}: a Linear inside checkpointing, mixed-precision or LoRA wrappers is
 * quantized in place inside them, from its FP32 master under mixed precision, so quantizing before or after applying
 * those decorators gives the same model. Pass the outermost block.
 */
public final class Quantizer {

    private Quantizer() {}

    /**
     * Quantizes {@code root} in place.
     *
     * @return what was quantized (SQNR, bytes) and what was skipped and why
     * @throws IllegalArgumentException if nothing passes the filter or an override names no layer (the message names
     *     the layer types seen), AWQ is asked for without calibration inputs, or the root itself is a Linear
     */
    public static QuantizationReport quantize(Block root, QuantizationConfig config) {
        return quantize(root, config, null);
    }

    /** As {@link #quantize(Block, QuantizationConfig)}, telling {@code progress} (if not null) after each layer. */
    public static QuantizationReport quantize(Block root, QuantizationConfig config, QuantizationProgress progress) {
        Preconditions.checkNotNull(root, "root");
        Preconditions.checkNotNull(config, "config");
        Preconditions.checkArgument(!(root instanceof Linear),
                "the root block is itself a Linear: wrap it in a parent block (e.g. SequentialBlock) to quantize it");
        // decided on what computes at each path, seen through decorators and adapters: a checkpointed, mixed-precision
        // or LoRA-adapted Linear is quantized in place, inside its wrappers
        Map<String, BlockSite> sites = Blocks.sites(root);
        Map<String, Block> blocks = new LinkedHashMap<>();
        sites.forEach((path, site) -> blocks.put(path, site.core()));
        Map<String, Target> targets = new LinkedHashMap<>();
        Map<String, Target> embeddings = new LinkedHashMap<>();
        Map<String, String> skipped = new LinkedHashMap<>();
        plan(blocks, config, path -> {
            Block b = blocks.get(path);
            Parameter weight = b instanceof Linear ? b.getParameters().get("weight") : embeddingTable(b);
            Preconditions.checkArgument(weight.isInitialized(),
                    "%s '%s' is not initialized: initialize or load the model before quantizing it",
                    b instanceof Linear ? "Linear" : "embedding", path);
            return weight.getArray().getShape().get(1);
        }, targets, embeddings, skipped);
        Block model = BlockDecorator.unwrap(root);
        if (model instanceof DeepSeekForCausalLM && ((DeepSeekForCausalLM) model).config().tieWordEmbeddings()) {
            for (String path : new ArrayList<>(embeddings.keySet())) {
                if (blocks.get(path) == ((DeepSeekForCausalLM) model).model().tokenEmbedding()) {
                    embeddings.remove(path);
                    skipped.put(path, "embedding tied to the output projection (tie_word_embeddings): its float table"
                            + " computes the logits, kept in full precision");
                }
            }
        }
        if (targets.isEmpty() && embeddings.isEmpty() && !anySelected(blocks, config)) {
            throw new IllegalArgumentException(nothingMatched(root, sites, skipped));
        }
        checkOverridesMatch(root, blocks, config);

        boolean calibrated = targets.values().stream().anyMatch(t -> t.config.method() != QuantMethod.RTN);
        Calibration calibration = null;
        if (calibrated) {
            calibration = config.calibration().orElseThrow(() -> new IllegalArgumentException(
                    "AWQ and GPTQ need calibration inputs: set optCalibration(Calibration.of(batches)) on the root"
                            + " config"));
        }
        Set<Parameter> kept = Collections.newSetFromMap(new IdentityHashMap<>());
        for (BlockSite site : sites.values()) {
            site.wrappers().forEach(w -> w.getDirectParameters().values().forEach(kept::add)); // LoRA adapters
            if (!targets.containsKey(site.path()) && !embeddings.containsKey(site.path())) {
                site.core().getDirectParameters().values().forEach(kept::add);
            }
        }
        List<QuantizationReport.Layer> layers = new ArrayList<>();
        int total = embeddings.size() + targets.size();
        for (Map.Entry<String, Target> e : embeddings.entrySet()) {
            layers.add(EmbeddingQuantizer.quantize(root, e.getKey(), blocks.get(e.getKey()), e.getValue(), kept));
            tell(progress, layers.size(), total, e.getKey());
        }
        List<String> order = new ArrayList<>(targets.keySet());
        int passes = 0;
        int next = 0;
        while (next < order.size()) {
            // one calibration pass records the inputs of as many AWQ layers (in tree order) as fit in the budget;
            // layers quantized in earlier passes are already quantized when later ones are recorded, as in AWQ's
            // layer-by-layer procedure, and recordings never exceed the budget at once
            Map<String, Target> chunk = new LinkedHashMap<>();
            long bytes = 0;
            while (next < order.size()) {
                String path = order.get(next);
                Target t = targets.get(path);
                long need = t.config.method() == QuantMethod.RTN ? 0
                        : ActivationRecorder.bytesNeeded(
                                ((Linear) blocks.get(path)).getParameters().get("weight").getShape().get(1),
                                calibration.maxRowsPerLayer(), t.config.method() == QuantMethod.GPTQ);
                if (need > 0 && bytes > 0 && bytes + need > calibration.maxBytesPerPass()) {
                    break;
                }
                bytes += need;
                chunk.put(path, t);
                next++;
            }
            Map<String, ActivationRecorder> recorders = Collections.emptyMap();
            if (bytes > 0) {
                Map<String, QuantMethod> methods = new LinkedHashMap<>();
                chunk.forEach((path, t) -> methods.put(path, t.config.method()));
                recorders = ActivationRecorder.record(root, methods, calibration);
                passes++;
            }
            try {
                for (Map.Entry<String, Target> t : chunk.entrySet()) {
                    layers.add(quantizeLayer(root, t.getKey(), (Linear) blocks.get(t.getKey()), t.getValue(),
                            recorders.get(t.getKey()), kept));
                    tell(progress, layers.size(), total, t.getKey());
                }
            } finally {
                recorders.values().forEach(ActivationRecorder::close);
            }
        }
        return new QuantizationReport(layers, skipped, passes);
    }

    private static void tell(QuantizationProgress progress, int done, int total, String path) {
        if (progress != null) {
            progress.layerDone(done, total, path);
        }
    }

    /**
     * Whether the filter and overrides select any layer not yet quantized, whether or not it can then be quantized (a
     * width that no int4 group divides is reported as skipped, not as a filter that matched nothing).
     */
    private static boolean anySelected(Map<String, Block> blocks, QuantizationConfig config) {
        for (Map.Entry<String, Block> e : blocks.entrySet()) {
            String path = e.getKey();
            Block block = e.getValue();
            boolean table = embeddingTable(block) != null;
            if (!table && !(block instanceof Linear)) {
                continue;
            }
            Optional<LayerOverride> override = config.overrides().stream().filter(o -> o.matches(path)).findFirst();
            if (override.isPresent() ? override.get().config().isPresent()
                    : table ? config.includeEmbeddings() : config.filter().skipReason(path, block).isEmpty()) {
                return true;
            }
        }
        return false;
    }

    /** An override that names no layer is a typo or a different model: said, rather than silently ignored. */
    private static void checkOverridesMatch(Block root, Map<String, Block> blocks, QuantizationConfig config) {
        for (LayerOverride o : config.overrides()) {
            boolean matched = blocks.entrySet().stream().anyMatch(e -> o.matches(e.getKey())
                    && (e.getValue() instanceof Linear || embeddingTable(e.getValue()) != null
                            || e.getValue() instanceof QuantizedLinear || e.getValue() instanceof QuantizedEmbedding));
            if (!matched) {
                List<Block> seen = new ArrayList<>();
                blocks.forEach((path, b) -> {
                    if (!path.isEmpty()) {
                        seen.add(b);
                    }
                });
                throw new IllegalArgumentException("override '" + o.pattern() + "' matches no Linear layer or"
                        + " embedding table of " + root.getClass().getSimpleName() + "; layer types seen: "
                        + Blocks.describeTypes(seen));
            }
        }
    }

    /** Why nothing was quantized: what the filter skipped and the types of the blocks it saw. */
    private static String nothingMatched(Block root, Map<String, BlockSite> sites, Map<String, String> skipped) {
        List<Block> seen = new ArrayList<>();
        sites.values().stream().filter(s -> !s.path().isEmpty()).forEach(s -> seen.add(s.core()));
        StringBuilder why = new StringBuilder();
        skipped.entrySet().stream().limit(4).forEach(e -> why.append(why.length() == 0 ? "" : "; ")
                .append(e.getKey()).append(": ").append(e.getValue()));
        return "nothing to quantize in " + root.getClass().getSimpleName() + ": no Linear layer or embedding table"
                + " passes the filter and overrides" + (skipped.isEmpty() ? "" : " (skipped " + skipped.size() + ": "
                + why + (skipped.size() > 4 ? "; ..." : "") + ")") + "; layer types seen: "
                + Blocks.describeTypes(seen);
    }

    /**
     * Sorts the blocks into layers to quantize ({@code targets}) and blocks with parameters that stay ({@code
     * skipped}, with the reason). {@code inFeatures} gives a Linear's input dimension: from its weight here, from the
     * checkpoint in {@link StreamingQuantizedLoader}, which plans before any weight is read.
     */
    static void plan(Map<String, Block> blocks, QuantizationConfig config, ToLongFunction<String> inFeatures,
            Map<String, Target> targets, Map<String, String> skipped) {
        plan(blocks, config, inFeatures, targets, null, skipped);
    }

    /**
     * {@link #plan(Map, QuantizationConfig, ToLongFunction, Map, Map)} that also puts the embedding tables to quantize
     * into {@code embeddings} ({@code inFeatures} then gives their hidden size). With {@code embeddings} null (a
     * caller that cannot quantize embeddings) an embedding the config asks for is reported as skipped, saying why.
     */
    static void plan(Map<String, Block> blocks, QuantizationConfig config, ToLongFunction<String> inFeatures,
            Map<String, Target> targets, Map<String, Target> embeddings, Map<String, String> skipped) {
        for (Map.Entry<String, Block> e : blocks.entrySet()) {
            String path = e.getKey();
            Block block = e.getValue();
            if (block instanceof QuantizedLinear || block instanceof QuantizedEmbedding) {
                skipped.put(path, "already quantized");
                continue;
            }
            if (embeddingTable(block) != null) {
                Map<String, Target> planned = new LinkedHashMap<>();
                planLayer(path, () -> config.includeEmbeddings() ? Optional.empty() : Optional.of(EMBEDDING_DEFAULT),
                        () -> inFeatures.applyAsLong(path), config, planned, skipped);
                if (!planned.isEmpty()) {
                    if (embeddings == null) {
                        skipped.put(path, "embedding: this loader cannot quantize embedding tables (use"
                                + " Quantizer.quantize on the loaded model), kept in full precision");
                    } else {
                        embeddings.putAll(planned);
                    }
                }
                continue;
            }
            if (!(block instanceof Linear)) {
                if (!block.getDirectParameters().isEmpty()) {
                    skipped.put(path, nonLinearReason(path, block));
                }
                continue;
            }
            // the input size is asked for only once the filter keeps the layer (a skipped one may stay uninitialized)
            planLayer(path, () -> config.filter().skipReason(path, block), () -> inFeatures.applyAsLong(path), config,
                    targets, skipped);
        }
    }

    /** The reason an embedding table is skipped when nothing asks for it. */
    static final String EMBEDDING_DEFAULT = "embedding kept in full precision by default (a lookup, not a matmul;"
            + " opt in with optIncludeEmbeddings / --include-embeddings or an override)";

    /**
     * The table parameter {@code (vocab, hidden)} of an embedding block the quantizer can replace (the DeepSeek
     * {@code TokenEmbedding}'s {@code weight}, DJL {@code Embedding}'s {@code embedding}), or null for other blocks.
     */
    static Parameter embeddingTable(Block block) {
        return QuantizedEmbedding.tableParameter(block);
    }

    /**
     * Decides one layer (not yet quantized) whose weight has {@code inFeatures} columns: puts it into {@code targets}
     * with its effective config and group size, or into {@code skipped} with the reason. Without a matching override,
     * {@code defaultSkip} says whether it is skipped (the filter for a Linear).
     */
    private static void planLayer(String path, Supplier<Optional<String>> defaultSkip, LongSupplier inFeatures,
            QuantizationConfig config, Map<String, Target> targets, Map<String, String> skipped) {
        Optional<LayerOverride> override =
                config.overrides().stream().filter(o -> o.matches(path)).findFirst();
        QuantizationConfig effective = config;
        if (override.isPresent()) {
            if (override.get().config().isEmpty()) {
                skipped.put(path, "override '" + override.get().pattern() + "': skip");
                return;
            }
            effective = override.get().config().get();
        } else {
            Optional<String> reason = defaultSkip.get();
            if (reason.isPresent()) {
                skipped.put(path, reason.get());
                return;
            }
        }
        long in = inFeatures.getAsLong();
        int group = effective.groupSize();
        String note = null;
        if (effective.scheme() == QuantScheme.INT4_WEIGHT_ONLY && in % group != 0) {
            int fallback = 0;
            boolean allowed = ((Int4WeightOnlyConfig) effective).groupSizeFallback();
            if (allowed) {
                for (int g = group / 2; g >= 32 && fallback == 0; g /= 2) {
                    fallback = in % g == 0 ? g : 0;
                }
            }
            if (fallback == 0) {
                skipped.put(path, String.format(Locale.ROOT,
                        "input dimension %d is not a multiple of the int4 group size %d%s", in, group,
                        allowed && group > 32 ? " or of a smaller one" : ""));
                return;
            }
            note = String.format(Locale.ROOT, "group size %d: input dimension %d is not a multiple of %d",
                    fallback, in, group);
            group = fallback;
        }
        targets.put(path, new Target(effective, group, note));
    }

    /** A layer to quantize: its config, the group size actually used and why it differs. */
    static final class Target {
        final QuantizationConfig config;
        final int groupSize;
        final String note;

        Target(QuantizationConfig config, int groupSize, String note) {
            this.config = config;
            this.groupSize = groupSize;
            this.note = note;
        }
    }

    private static String nonLinearReason(String path, Block block) {
        String name = path.substring(path.lastIndexOf('.') + 1).toLowerCase(Locale.ROOT);
        if (name.contains("norm")) {
            return "normalization weights: tiny and scale every activation, kept in full precision";
        }
        if (name.contains("embed")) {
            return "embedding table of an unsupported block (" + block.getClass().getSimpleName()
                    + "): only TokenEmbedding and DJL Embedding tables can be quantized, kept in full precision";
        }
        if (name.equals("gate")) {
            return "MoE router: top-k routing is discrete, kept in full precision";
        }
        return "not a Linear layer (" + block.getClass().getSimpleName() + ")";
    }

    private static QuantizationReport.Layer quantizeLayer(Block root, String path, Linear linear, Target target,
            ActivationRecorder recorder, Set<Parameter> kept) {
        QuantizationConfig config = target.config;
        BlockSite site = Blocks.site(root, path);
        Parameter weightParam = linear.getParameters().get("weight");
        Parameter biasParam = linear.getParameters().contains("bias") ? linear.getParameters().get("bias") : null;
        // the master copy where a mixed-precision decorator above keeps one: the same values as quantizing first
        NDArray weight = site.value(weightParam); // (out, in)
        long in = weight.getShape().get(1);
        int groupSize = config.scheme() == QuantScheme.INT8_WEIGHT_ONLY ? (int) in : target.groupSize;
        QuantizedTensor q;
        Double alpha = null;
        QuantMethod method = config.method();
        String note = target.note;
        if (method != QuantMethod.RTN && !recorder.hasActivations()) {
            // e.g. a routed expert that no calibration token was sent to: nothing to weigh the channels by
            String rtn = method.id().toUpperCase(Locale.ROOT)
                    + ": no calibration activation reached this layer, quantized with RTN";
            method = QuantMethod.RTN;
            note = note == null ? rtn : note + "; " + rtn;
        }
        if (method == QuantMethod.GPTQ) {
            q = GptqSolver.quantize(weight, recorder.xtx(), recorder.count(), config.scheme(), groupSize);
        } else if (method == QuantMethod.AWQ) {
            try (NDArray meanAbs = recorder.meanAbs()) {
                AwqSearch.Result r = AwqSearch.search(weight, recorder.rows(), meanAbs, config.scheme(), groupSize,
                        config.awqGridSize());
                q = r.tensor;
                alpha = r.alpha;
            }
        } else {
            q = QuantizedTensor.quantize(weight, config.scheme(), groupSize);
        }
        Quantized result = finish(path, weight, biasParam == null ? null : site.value(biasParam), q, config.scheme(),
                method, groupSize, alpha, note);
        site.replaceCore(old -> result.linear);
        if (!kept.contains(weightParam)) {
            weightParam.close();
        }
        if (biasParam != null && !kept.contains(biasParam)) {
            biasParam.close();
        }
        return result.layer;
    }

    /**
     * Round-to-nearest quantization of one layer's {@code weight (out, in)} as {@code target} says: the codes, the
     * replacement layer and its report row, exactly what {@link #quantize} produces for an RTN target. The codes (and a
     * copy of {@code bias}) are attached to {@code weight}'s manager; the caller installs the layer and frees the float
     * weight.
     */
    static Quantized quantizeRtn(String path, NDArray weight, NDArray bias, Target target) {
        QuantizationConfig config = target.config;
        int groupSize = config.scheme() == QuantScheme.INT8_WEIGHT_ONLY ? (int) weight.getShape().get(1)
                : target.groupSize;
        QuantizedTensor q = QuantizedTensor.quantize(weight, config.scheme(), groupSize);
        return finish(path, weight, bias, q, config.scheme(), QuantMethod.RTN, groupSize, null, target.note);
    }

    private static Quantized finish(String path, NDArray weight, NDArray bias, QuantizedTensor q, QuantScheme scheme,
            QuantMethod method, int groupSize, Double alpha, String note) {
        double sqnr = sqnrDb(weight, q);
        long before = bytes(weight);
        long after = q.nbytes();
        NDArray biasCopy = null;
        if (bias != null) {
            biasCopy = bias.duplicate();
            before += bytes(bias);
            after += bytes(bias);
        }
        QuantizedLinear replacement = QuantizedLinear.of(q, biasCopy, weight.getDataType(), method);
        return new Quantized(replacement, new QuantizationReport.Layer(path, scheme, method, groupSize, before, after,
                sqnr, alpha, note));
    }

    /** A quantized layer and its report row. */
    static final class Quantized {
        final QuantizedLinear linear;
        final QuantizationReport.Layer layer;

        Quantized(QuantizedLinear linear, QuantizationReport.Layer layer) {
            this.linear = linear;
            this.layer = layer;
        }
    }

    /** {@code 10 log10(|W|^2 / |W - dequant(q)|^2)}; +Infinity if exact. */
    static double sqnrDb(NDArray weight, QuantizedTensor q) {
        try (NDManager tmp = weight.getManager().newSubManager(weight.getDevice())) {
            NDArray w = weight.toType(DataType.FLOAT32, true);
            w.attach(tmp);
            NDArray d = q.dequantize(tmp, DataType.FLOAT32);
            double signal = w.square().sum().getFloat();
            double noise = w.sub(d).square().sum().getFloat();
            return noise == 0 ? Double.POSITIVE_INFINITY : 10 * Math.log10(signal / noise);
        }
    }

    private static long bytes(NDArray a) {
        return a.size() * a.getDataType().getNumOfBytes();
    }
}
