package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.gguf.GgmlType;
import ai.djl.memopt.gguf.GgufExporter;
import ai.djl.memopt.gguf.GgufFile;
import ai.djl.memopt.gguf.GgufModelFiles;
import ai.djl.memopt.gguf.GgufTensorInfo;
import ai.djl.memopt.gguf.GgufTokenizer;
import ai.djl.memopt.gguf.GgufValue;
import ai.djl.memopt.gguf.GgufValueType;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Locale;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.Callable;
import picocli.CommandLine;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

/**
 * {@code memopt gguf}: GGUF files for llama.cpp, Ollama and LM Studio (llama.cpp's {@code deepseek2} architecture).
 *
 * <pre>
 * memopt gguf export --model DIR_OR_ARTIFACT --type q4_0 --out model-q4_0.gguf
 * memopt gguf info model-q4_0.gguf
 * </pre>
 *
 * <p>Every other command's {@code --model} also takes a {@code .gguf} file.
 */
@Command(name = "gguf", mixinStandardHelpOptions = true,
        description = "Export DeepSeek-V2/V3 models as GGUF (llama.cpp's deepseek2) or inspect a GGUF file.",
        subcommands = {GgufCommand.Export.class, GgufCommand.Info.class})
public final class GgufCommand implements Runnable {

    @CommandLine.Spec CommandLine.Model.CommandSpec spec;

    @Override
    public void run() {
        spec.commandLine().usage(System.out);
    }

    /** {@code memopt gguf export}. */
    @Command(name = "export", mixinStandardHelpOptions = true,
            description = "Write a model (Hugging Face directory, quantized artifact or GGUF file) as a GGUF file of "
                    + "llama.cpp's deepseek2 architecture; prints one JSON line.")
    static final class Export implements Callable<Integer> {

        @Option(names = "--model", required = true, paramLabel = "DIR_OR_ARTIFACT",
                description = "Hugging Face model directory, quantized artifact, or GGUF file.")
        Path model;

        @Option(names = "--type", required = true, paramLabel = "f32|f16|q8_0|q4_0",
                description = "Tensor type of the matrices (vectors, norms and the router stay f32; rows that are not "
                        + "whole blocks of 32 fall back to f16).")
        String type;

        @Option(names = "--out", required = true, paramLabel = "FILE.gguf", description = "The GGUF file to write.")
        Path out;

        @Option(names = "--tokenizer-pre", paramLabel = "NAME",
                description = "llama.cpp's pre-tokenizer name (default: recognised from tokenizer.json: gpt-2 or "
                        + "deepseek-v3).")
        String tokenizerPre;

        @Option(names = "--no-vocab", description = "For a model without tokenizer.json: write llama.cpp's "
                + "no-vocabulary mode (tokenizer.ggml.model = none) instead of a placeholder byte vocabulary. Some "
                + "front ends (node-llama-cpp) cannot load such a file.")
        boolean noVocab;

        @Option(names = "--json", description = "Accepted for consistency: the result is always one JSON line.")
        boolean json;

        @Override
        public Integer call() throws Exception {
            GgmlType t = parseType(type);
            if (!Files.isDirectory(model) && !GgufFile.isGguf(model)) {
                throw new IllegalArgumentException("--model " + model
                        + ": not a model directory, quantized artifact or GGUF file");
            }
            if (noVocab && tokenizerPre != null) {
                throw new IllegalArgumentException("give --no-vocab or --tokenizer-pre, not both");
            }
            long start = System.nanoTime();
            try (NDManager manager = NDManager.newBaseManager(Device.cpu())) {
                DeepSeekForCausalLM lm = ModelDirectories.loadDeepSeek(model, manager, DataType.FLOAT32);
                Path files = GgufModelFiles.directoryOf(model);
                GgufExporter.Report r = GgufExporter.export(lm, files, t, out,
                        noVocab ? GgufTokenizer.NONE : tokenizerPre);
                JsonObject o = new JsonObject();
                o.addProperty("model", model.toString());
                o.addProperty("out", out.toString());
                o.addProperty("type", t.name().toLowerCase(Locale.ROOT));
                o.addProperty("architecture", "deepseek2");
                o.addProperty("tensors", r.tensors().size());
                o.addProperty("bytes", r.bytes());
                o.addProperty("tokenizer", r.tokenizerPre());
                JsonArray fallbacks = new JsonArray();
                r.fallbacks().forEach(fallbacks::add);
                o.add("fallbacks", fallbacks);
                o.addProperty("seconds", (System.nanoTime() - start) / 1e9);
                System.out.println(o);
            }
            return 0;
        }
    }

    /** {@code memopt gguf info}. */
    @Command(name = "info", mixinStandardHelpOptions = true,
            description = "Print a GGUF file's metadata (arrays summarised) and tensor types as one JSON line.")
    static final class Info implements Callable<Integer> {

        @Parameters(index = "0", paramLabel = "FILE.gguf", description = "The GGUF file.")
        Path file;

        @Override
        public Integer call() throws Exception {
            try (GgufFile f = GgufFile.open(file)) {
                JsonObject o = new JsonObject();
                o.addProperty("file", file.toString());
                o.addProperty("version", f.version());
                JsonObject meta = new JsonObject();
                for (Map.Entry<String, GgufValue> e : f.metadata().entrySet()) {
                    GgufValue v = e.getValue();
                    if (v.type() == GgufValueType.ARRAY) {
                        meta.addProperty(e.getKey(), v.toString());
                    } else if (v.type() == GgufValueType.STRING) {
                        String s = v.asString();
                        meta.addProperty(e.getKey(), s.length() > 200 ? s.substring(0, 200) + "... (" + s.length()
                                + " chars)" : s);
                    } else if (v.value() instanceof Boolean) {
                        meta.addProperty(e.getKey(), v.asBool());
                    } else {
                        meta.addProperty(e.getKey(), (Number) v.value());
                    }
                }
                o.add("metadata", meta);
                Map<String, Integer> types = new TreeMap<>();
                long bytes = 0;
                for (GgufTensorInfo t : f.tensors().values()) {
                    types.merge(t.type().name(), 1, Integer::sum);
                    bytes += t.byteLength();
                }
                JsonObject typeCounts = new JsonObject();
                types.forEach(typeCounts::addProperty);
                o.addProperty("tensors", f.tensors().size());
                o.add("tensorTypes", typeCounts);
                o.addProperty("tensorBytes", bytes);
                System.out.println(o);
            }
            return 0;
        }
    }

    static GgmlType parseType(String type) {
        switch (type.toLowerCase(Locale.ROOT)) {
            case "f32":
                return GgmlType.F32;
            case "f16":
                return GgmlType.F16;
            case "q8_0":
                return GgmlType.Q8_0;
            case "q4_0":
                return GgmlType.Q4_0;
            default:
                throw new IllegalArgumentException("--type must be f32, f16, q8_0 or q4_0, got '" + type + "'");
        }
    }
}
