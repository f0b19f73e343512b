package ai.djl.memopt.examples.cli;

import ai.djl.memopt.inference.ChatMessage;
import ai.djl.memopt.inference.GenerationModel;
import ai.djl.memopt.inference.GenerationRequest;
import ai.djl.memopt.inference.GenerationResult;
import ai.djl.memopt.inference.Generator;
import ai.djl.memopt.inference.SamplingParams;
import ai.djl.memopt.inference.TextTokenizer;
import ai.djl.ndarray.NDManager;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.List;
import java.util.concurrent.Callable;
import picocli.CommandLine.ArgGroup;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;

/**
 * {@code memopt generate}: generates from a DeepSeek checkpoint directory with the compressed MLA cache. Greedy unless
 * a sampling option is given; text prompts need the directory's {@code tokenizer.json}.
 *
 * <pre>
 * memopt generate --model DIR --prompt "Hello" --max-new-tokens 32
 * memopt generate --model DIR --prompt-ids 5,17,3 --max-new-tokens 16 --json
 * memopt generate --model DIR --prompt "Once" --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 1
 * </pre>
 */
@Command(
        name = "generate",
        mixinStandardHelpOptions = true,
        description = "Generate text or token ids from a DeepSeek-V2/V3 checkpoint (compressed MLA cache).")
public final class GenerateCommand implements Callable<Integer> {

    @Option(names = "--model", required = true, paramLabel = "DIR",
            description = "Model directory: a Hugging Face checkpoint (config.json, safetensors) or a quantized artifact")
    Path model;

    @Option(names = "--adapter", paramLabel = "DIR",
            description = "A LoRA adapter (PEFT layout, as memopt finetune --lora-rank writes it) to run on the"
                    + " model, unmerged; on a quantized artifact the base stays quantized.")
    Path adapter;

    @ArgGroup(exclusive = true, multiplicity = "1")
    Prompt prompt;

    static final class Prompt {
        @Option(names = "--prompt", paramLabel = "TEXT", description = "prompt text (needs tokenizer.json)")
        String text;

        @Option(names = "--prompt-ids", paramLabel = "IDS", split = ",", description = "prompt token ids, e.g. 5,17,3")
        long[] ids;
    }

    @Option(names = "--chat", description = "wrap --prompt as a user message in the model's chat template")
    boolean chat;

    @Option(names = {"--max-new-tokens", "--max-tokens", "--new-tokens"}, required = true, paramLabel = "N",
            converter = OptionValues.Positive.class, description = "tokens to generate at most (prompt + N within max_position_embeddings)")
    int maxNewTokens;

    @Option(names = "--temperature", paramLabel = "T", converter = OptionValues.Temperature.class,
            description = "sampling temperature, 0 to 2 (0 = greedy)")
    Float temperature;

    @Option(names = "--top-p", paramLabel = "P", converter = OptionValues.TopP.class, description = "nucleus sampling probability mass")
    Float topP;

    @Option(names = "--top-k", paramLabel = "K", converter = OptionValues.NonNegative.class, description = "sample among the K most likely tokens")
    Integer topK;

    @Option(names = "--seed", paramLabel = "S", description = "sampling seed (same seed, same tokens)")
    Long seed;

    @Option(names = "--stop", paramLabel = "TEXT", description = "stop string (repeatable)")
    List<String> stops;

    @Option(names = "--ignore-eos", description = "keep generating past EOS")
    boolean ignoreEos;

    @Option(names = "--device", defaultValue = "cpu", paramLabel = "cpu|gpu", description = "default: ${DEFAULT-VALUE}")
    String device;

    @Option(names = "--dtype", defaultValue = "fp32", paramLabel = "fp32|fp16", description = "default: ${DEFAULT-VALUE}")
    String dtype;

    @Option(names = "--json", description = "print one JSON line with prompt_ids, output_ids, text, finish_reason")
    boolean json;

    @Override
    public Integer call() throws Exception {
        SamplingParams.Builder b = SamplingParams.builder().setMaxNewTokens(maxNewTokens).optIgnoreEos(ignoreEos);
        boolean sampling = temperature != null || topP != null || topK != null;
        if (sampling) {
            b.optTemperature(temperature != null ? temperature : 1f);
            if (topP != null) {
                b.optTopP(topP);
            }
            if (topK != null) {
                b.optTopK(topK);
            }
        }
        if (seed != null) {
            b.optSeed(seed);
        }
        if (stops != null) {
            b.optStopStrings(stops);
        }
        SamplingParams params = b.build();
        if (chat && prompt.text == null) {
            throw new IllegalArgumentException("--chat needs --prompt TEXT");
        }
        PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
        try (GenerationModel m = GenerationModel.open(model, Devices.parse(device), Devices.dtype(dtype), adapter)) {
            TextTokenizer tok = m.tokenizer().orElse(null);
            if (prompt.ids == null && tok == null) {
                throw new IllegalArgumentException(m.files().absence("tokenizer.json") + ": give --prompt-ids instead of --prompt");
            }
            GenerationRequest.Builder request = GenerationRequest.builder().setParams(params);
            if (prompt.ids != null) {
                request.optPromptIds(prompt.ids);
            } else if (chat) {
                request.optMessages(List.of(ChatMessage.user(prompt.text)));
            } else {
                request.optText(prompt.text);
            }
            // prompt + --max-new-tokens must fit the context: checked before tokenizing a text that cannot fit
            long[] ids = request.build().promptIds(tok, m.decoder().maxLength());
            Generator g = m.generator();
            GenerationResult r;
            long t0 = System.nanoTime();
            try (NDManager manager = NDManager.newBaseManager(m.decoder().device())) {
                boolean stream = !json && tok != null;
                r = g.generate(
                                manager,
                                List.of(ids),
                                params,
                                stream ? (i, id, delta) -> out.print(delta) : null,
                                () -> Thread.currentThread().isInterrupted())
                        .get(0);
                if (stream) {
                    out.println();
                }
            }
            double seconds = (System.nanoTime() - t0) / 1e9;
            if (json) {
                JsonObject o = new JsonObject();
                o.add("prompt_ids", array(ids));
                o.add("output_ids", array(r.outputIds()));
                if (r.text() != null) {
                    o.addProperty("text", r.text());
                }
                o.addProperty("finish_reason", r.finishReason().wireName());
                o.addProperty("seconds", seconds);
                o.addProperty("cache_bytes_per_token", m.decoder().cacheBytesPerToken());
                out.println(new GsonBuilder().disableHtmlEscaping().create().toJson(o));
            } else if (tok == null) {
                StringBuilder sb = new StringBuilder();
                for (long id : r.outputIds()) {
                    sb.append(sb.length() == 0 ? "" : " ").append(id);
                }
                out.println(sb);
            }
        }
        return 0;
    }

    private static JsonArray array(long[] ids) {
        JsonArray a = new JsonArray();
        for (long id : ids) {
            a.add(id);
        }
        return a;
    }
}
