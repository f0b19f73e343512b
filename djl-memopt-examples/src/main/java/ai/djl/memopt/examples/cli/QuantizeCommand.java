package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.huggingface.tokenizers.Encoding;
import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer;
import ai.djl.memopt.export.ArtifactManifest;
import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.gguf.GgufFile;
import ai.djl.memopt.gguf.GgufModelFiles;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.quantize.Calibration;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.LayerFilter;
import ai.djl.memopt.quantize.LayerOverride;
import ai.djl.memopt.quantize.PruningConfig;
import ai.djl.memopt.quantize.PruningReport;
import ai.djl.memopt.quantize.Pruner;
import ai.djl.memopt.quantize.QuantMethod;
import ai.djl.memopt.quantize.QuantizationConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.quantize.StreamingQuantizedLoader;
import ai.djl.memopt.safetensors.RegularFiles;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Optional;
import java.util.concurrent.Callable;
import java.util.stream.Collectors;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.ParameterException;
import picocli.CommandLine.Spec;
import picocli.CommandLine.Model.CommandSpec;

/**
 * {@code memopt quantize}: loads a Hugging Face DeepSeek-V2/V3 model directory, optionally prunes it (2:4 or
 * unstructured), quantizes its Linear weights (int8 per channel or int4 group-wise, RTN or AWQ), writes a
 * self-contained artifact directory ({@code model.safetensors}, {@code config.json}, {@code quantization.json}) and
 * prints the per-layer report.
 *
 * <pre>
 * memopt quantize --model DIR --scheme int4 --group-size 128 --method awq --calibration sample.txt --out q4/
 * memopt quantize --model DIR --scheme int4 --include-lm-head --include-embeddings --embedding-scheme int8 --out q4e/
 * </pre>
 *
 * <p>{@code --include-embeddings} also quantizes the token embedding table ({@code QuantizedEmbedding}; round to
 * nearest whatever {@code --method} says, a lookup has no input activations); the artifact is then format version 2.
 */
@Command(name = "quantize", mixinStandardHelpOptions = true,
        description = "Quantize (and optionally prune) a DeepSeek model into a self-contained artifact directory.")
public final class QuantizeCommand implements Callable<Integer> {

    @Spec CommandSpec spec;

    @Option(names = "--model", required = true, paramLabel = "DIR",
            description = "Hugging Face model directory (config.json + safetensors).")
    Path model;

    @Option(names = "--scheme", required = true, paramLabel = "int8|int4|none",
            description = "Weight-only scheme; 'none' with --prune writes a pruned (2:4: compact) artifact.")
    String scheme;

    @Option(names = "--group-size", defaultValue = "128", paramLabel = "32|64|128",
            description = "int4 group size (default ${DEFAULT-VALUE}).")
    int groupSize;

    @Option(names = "--method", defaultValue = "rtn", paramLabel = "rtn|awq|gptq",
            description = "Rounding method (default ${DEFAULT-VALUE}); awq and gptq need --calibration.")
    String method;

    @Option(names = "--calibration", paramLabel = "FILE",
            description = "AWQ/GPTQ calibration data: UTF-8 text (tokenized with the model's tokenizer.json), or a .ids "
                    + "file of whitespace-separated token ids, one sequence per line.")
    Path calibration;

    @Option(names = "--calibration-samples", defaultValue = "16", paramLabel = "N",
            description = "Text calibration: at most this many sequences (default ${DEFAULT-VALUE}).")
    int calibrationSamples;

    @Option(names = "--calibration-seq-len", defaultValue = "128", paramLabel = "T",
            description = "Text calibration: tokens per sequence (default ${DEFAULT-VALUE}).")
    int calibrationSeqLen;

    @Option(names = "--awq-grid", defaultValue = "20", paramLabel = "N",
            description = "AWQ: number of scale exponents tried per layer (default ${DEFAULT-VALUE}).")
    int awqGrid;

    @Option(names = "--prune", paramLabel = "2:4|SPARSITY",
            description = "Magnitude-prune first: '2:4' or an unstructured per-layer sparsity such as 0.5.")
    String prune;

    @Option(names = "--include-lm-head", description = "Quantize (and prune) lm_head too.")
    boolean includeLmHead;

    @Option(names = "--include-embeddings",
            description = "Quantize the token embedding table (model.embed_tokens) too: round to nearest, one scale per"
                    + " row (token) for int8, groups of --group-size along the hidden size for int4. Not with"
                    + " tie_word_embeddings (the table is then the output projection and stays in float).")
    boolean includeEmbeddings;

    @Option(names = "--embedding-scheme", paramLabel = "int8|int4",
            description = "With --include-embeddings: the table's scheme if it differs from --scheme (e.g. int8"
                    + " embeddings in an int4 model).")
    String embeddingScheme;

    @Option(names = "--dtype", defaultValue = "fp32", paramLabel = "fp32|fp16",
            description = "Type of the unquantized weights (default ${DEFAULT-VALUE}).")
    String dtype;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "Device (default cpu).")
    String device;

    @Option(names = "--out", required = true, paramLabel = "DIR", description = "Artifact directory to write.")
    Path out;

    @Option(names = "--json", description = "Print one JSON line instead of tables.")
    boolean json;

    @Option(names = "--no-progress", description = "No progress bar on stderr.")
    boolean noProgress;

    @Override
    public Integer call() throws Exception {
        QuantMethod quantMethod = parseMethod();
        DataType type = Devices.dtype(dtype);
        Device dev = Devices.parse(device);
        boolean quantize = !"none".equals(scheme.toLowerCase(Locale.ROOT));
        if (!quantize && prune == null) {
            throw new ParameterException(spec.commandLine(), "--scheme none needs --prune (nothing to do otherwise)");
        }
        if (quantize && !scheme.equalsIgnoreCase("int8") && !scheme.equalsIgnoreCase("int4")) {
            throw new ParameterException(spec.commandLine(), "--scheme must be int8, int4 or none, got '" + scheme
                    + "'");
        }
        if (awqGrid < 1 || awqGrid > 1000) {
            throw new ParameterException(spec.commandLine(), "--awq-grid must be in [1, 1000], got " + awqGrid);
        }
        if (groupSize != 32 && groupSize != 64 && groupSize != 128) {
            throw new ParameterException(spec.commandLine(), "--group-size must be 32, 64 or 128, got " + groupSize);
        }
        if (quantMethod != QuantMethod.RTN && calibration == null) {
            throw new ParameterException(spec.commandLine(), "--method " + quantMethod.id()
                    + " needs --calibration FILE");
        }
        if (quantMethod == QuantMethod.RTN && calibration != null) {
            throw new ParameterException(spec.commandLine(), "--calibration is only used by --method awq or gptq");
        }
        if (includeEmbeddings && !quantize) {
            throw new ParameterException(spec.commandLine(), "--include-embeddings needs --scheme int8 or int4");
        }
        if (embeddingScheme != null) {
            if (!includeEmbeddings) {
                throw new ParameterException(spec.commandLine(), "--embedding-scheme needs --include-embeddings");
            }
            if (!embeddingScheme.equalsIgnoreCase("int8") && !embeddingScheme.equalsIgnoreCase("int4")) {
                throw new ParameterException(spec.commandLine(), "--embedding-scheme must be int8 or int4, got '"
                        + embeddingScheme + "'");
            }
        }
        PruningConfig pruning = prune == null ? null
                : PruningConfig.parse(prune).withFilter(LayerFilter.defaults(includeLmHead));
        boolean gguf = GgufFile.isGguf(model);
        if (!Files.isDirectory(model) && !gguf) {
            throw new IOException("--model " + model + ": not a directory");
        }
        if (ModelDirectories.isQuantizedArtifact(model)) {
            throw new IOException("--model " + model + " is already quantized ("
                    + QuantizedArtifact.readManifest(model).summary() + "); quantize the original model instead");
        }

        // RTN without pruning needs no activations: each layer is read and quantized on its own, so the float model
        // is never in memory (StreamingQuantizedLoader; same codes as load-then-quantize)
        boolean streaming = quantize && pruning == null && quantMethod == QuantMethod.RTN && !gguf;
        try (NDManager manager = NDManager.newBaseManager(dev)) {
            DeepSeekForCausalLM lm;
            PruningReport pruned = null;
            QuantizationReport report = null;
            if (streaming) {
                StreamingQuantizedLoader.Result r =
                        StreamingQuantizedLoader.load(model, manager, type, quantizationConfig(quantMethod, List.of()));
                lm = r.model();
                report = r.report();
                if (includeEmbeddings) {
                    // the streaming loader quantizes Linear layers only: the (already float) table is done here,
                    // every Linear left in float by the config stays so
                    QuantizationConfig.BaseBuilder<?> tables = builder(embeddingScheme != null ? embeddingScheme
                            : scheme).optIncludeEmbeddings(true).optFilter((path, block) -> Optional.of(
                                    "left in float by the streamed pass"));
                    report = report.combine(Quantizer.quantize(lm, build(tables)));
                }
            } else {
                lm = ModelDirectories.loadFloat(model, manager, type); // a GGUF file dequantized
                pruned = pruning == null ? null : Pruner.prune(lm, pruning);
                if (quantize) {
                    try (NDManager calibManager = manager.newSubManager()) {
                        List<NDList> batches = quantMethod != QuantMethod.RTN
                                ? calibrationBatches(calibManager, lm.config().vocabSize()) : List.of();
                        report = Quantizer.quantize(lm, quantizationConfig(quantMethod, batches),
                                noProgress ? null : QuantizeProgress.bar("quantize " + quantMethod.id()));
                    }
                }
            }
            JsonObject reports = new JsonObject();
            if (report != null) {
                reports.add("quantization", report.toJson());
            }
            if (pruned != null) {
                reports.add("pruning", pruned.toJson());
            }
            ExportOptions.Builder options = ExportOptions.builder().optSourceModel(model)
                    .optArchitecture(QuantizedArtifact.DEEPSEEK).optReportsJson(reports.toString());
            if (pruning != null && pruning.pattern() == PruningConfig.Pattern.SEMI_STRUCTURED_2_4) {
                // 2:4 layers left in float (not quantized, e.g. skipped for their width) are stored compactly
                options.optSparse24Layers(pruned.layers().stream().map(PruningReport.Layer::path)
                        .filter(p -> compactable(lm, p))
                        .collect(Collectors.toList()));
            }
            ArtifactManifest manifest = QuantizedArtifact.export(lm, out, options.build());
            long sourceBytes = 0;
            for (Path f : gguf ? List.of(model) : listSafetensors(model)) {
                sourceBytes += Files.size(f);
            }
            long artifactBytes = 0;
            for (String f : manifest.files().keySet()) {
                artifactBytes += f.endsWith(".safetensors") ? Files.size(out.resolve(f)) : 0;
            }
            print(report, pruned, manifest, sourceBytes, artifactBytes);
        }
        return 0;
    }

    private QuantizationConfig quantizationConfig(QuantMethod quantMethod, List<NDList> batches) {
        QuantizationConfig.BaseBuilder<?> b = builder(scheme);
        b.optMethod(quantMethod).optIncludeLmHead(includeLmHead).optAwqGridSize(awqGrid)
                .optIncludeEmbeddings(includeEmbeddings);
        if (embeddingScheme != null && !embeddingScheme.equalsIgnoreCase(scheme)) {
            b.addOverride(LayerOverride.use(EMBEDDING_PATH, build(builder(embeddingScheme))));
        }
        if (!batches.isEmpty()) {
            b.optCalibration(Calibration.of(batches));
        }
        return build(b);
    }

    /** The DeepSeek token embedding's block path. */
    static final String EMBEDDING_PATH = "model.embed_tokens";

    private QuantizationConfig.BaseBuilder<?> builder(String schemeId) {
        return schemeId.equalsIgnoreCase("int8")
                ? Int8WeightOnlyConfig.builder() : Int4WeightOnlyConfig.builder().optGroupSize(groupSize);
    }

    private static QuantizationConfig build(QuantizationConfig.BaseBuilder<?> b) {
        return b instanceof Int8WeightOnlyConfig.Builder
                ? ((Int8WeightOnlyConfig.Builder) b).build() : ((Int4WeightOnlyConfig.Builder) b).build();
    }

    private void print(QuantizationReport report, PruningReport pruned, ArtifactManifest manifest, long sourceBytes,
            long artifactBytes) {
        if (json) {
            JsonObject o = new JsonObject();
            o.addProperty("out", out.toString());
            o.addProperty("source_bytes", sourceBytes);
            o.addProperty("artifact_bytes", artifactBytes);
            o.addProperty("quantized_layers", manifest.layers().size());
            o.addProperty("sparse24_layers", manifest.sparse24().size());
            o.addProperty("quantized_embeddings", manifest.embeddings().size());
            if (report != null) {
                o.add("quantization", report.toJson());
            }
            if (pruned != null) {
                o.add("pruning", pruned.toJson());
            }
            System.out.println(o);
            return;
        }
        if (pruned != null) {
            System.out.print(pruned);
        }
        if (report != null) {
            System.out.print(report);
        }
        System.out.printf(Locale.ROOT, "wrote %s: %s %d bytes (source safetensors %d bytes, %.2fx smaller)%n", out,
                QuantizedArtifact.WEIGHTS, artifactBytes, sourceBytes,
                artifactBytes == 0 ? 0.0 : (double) sourceBytes / artifactBytes);
    }

    private QuantMethod parseMethod() {
        try {
            return QuantMethod.fromId(method);
        } catch (IllegalArgumentException e) {
            throw new ParameterException(spec.commandLine(), "--method: " + e.getMessage());
        }
    }

    /** Calibration batches (1, T) of token ids from a .ids file or tokenized text. */
    private List<NDList> calibrationBatches(NDManager manager, long vocab) throws IOException {
        if (!Files.exists(calibration)) {
            throw new IOException("--calibration " + calibration + ": no such file");
        }
        RegularFiles.require(calibration, "--calibration file");
        List<long[]> sequences = new ArrayList<>();
        if (calibration.getFileName().toString().endsWith(".ids")) {
            int lineNo = 0;
            for (String line : Files.readAllLines(calibration, StandardCharsets.UTF_8)) {
                lineNo++;
                String t = line.trim();
                if (t.isEmpty()) {
                    continue;
                }
                String[] parts = t.split("\\s+");
                long[] ids = new long[parts.length];
                for (int i = 0; i < parts.length; i++) {
                    try {
                        ids[i] = Long.parseLong(parts[i]);
                    } catch (NumberFormatException e) {
                        throw new IOException(calibration + " line " + lineNo + ": '" + parts[i]
                                + "' is not a token id");
                    }
                    if (ids[i] < 0 || ids[i] >= vocab) {
                        throw new IOException(calibration + " line " + lineNo + ": token id " + ids[i]
                                + " outside the model's vocabulary [0, " + vocab + ")");
                    }
                }
                sequences.add(ids);
            }
        } else {
            Path tokenizerJson = GgufModelFiles.directoryOf(model).resolve("tokenizer.json");
            if (!Files.isRegularFile(tokenizerJson)) {
                throw new IOException("--calibration " + calibration + " is text but " + model
                        + " has no tokenizer.json; pass a .ids file of token ids instead");
            }
            String text = Files.readString(calibration, StandardCharsets.UTF_8);
            long[] all;
            try (HuggingFaceTokenizer tok = HuggingFaceTokenizer.newInstance(tokenizerJson,
                    Map.of("addSpecialTokens", "false", "truncation", "false"))) {
                Encoding enc = tok.encode(text);
                all = enc.getIds();
            }
            for (int start = 0; start + calibrationSeqLen <= all.length && sequences.size() < calibrationSamples;
                    start += calibrationSeqLen) {
                long[] seq = java.util.Arrays.copyOfRange(all, start, start + calibrationSeqLen);
                for (long id : seq) {
                    if (id >= vocab) {
                        throw new IOException("tokenizer id " + id + " is outside the model's vocabulary " + vocab);
                    }
                }
                sequences.add(seq);
            }
        }
        if (sequences.isEmpty()) {
            throw new IOException("--calibration " + calibration + ": no calibration sequence (text shorter than "
                    + calibrationSeqLen + " tokens, or an empty .ids file)");
        }
        List<NDList> batches = new ArrayList<>();
        for (long[] seq : sequences) {
            batches.add(new NDList(manager.create(seq, new Shape(1, seq.length))));
        }
        return batches;
    }

    /** A still-float Linear whose input width is a multiple of 8 (what compact 2:4 storage needs). */
    private static boolean compactable(ai.djl.nn.Block root, String path) {
        ai.djl.nn.Block b = ai.djl.memopt.nn.Blocks.get(root, path);
        return b instanceof ai.djl.nn.core.Linear
                && b.getParameters().get("weight").getShape().get(1) % 8 == 0;
    }

    private static List<Path> listSafetensors(Path dir) throws IOException {
        try (java.util.stream.Stream<Path> s = Files.list(dir)) {
            return s.filter(p -> p.getFileName().toString().endsWith(".safetensors")).collect(Collectors.toList());
        }
    }
}
