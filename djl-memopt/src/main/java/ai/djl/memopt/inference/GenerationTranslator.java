package ai.djl.memopt.inference;

import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.translate.NoBatchifyTranslator;
import ai.djl.translate.TranslatorContext;
import com.google.common.base.Preconditions;
import java.util.Arrays;
import java.util.List;
import java.util.function.Function;

/**
 * Text generation through a plain DJL {@link ai.djl.inference.Predictor}: the model's block is the causal LM, the
 * translator tokenizes (text, ids or chat), and decodes with {@link Generator} over the {@link LanguageModel} made from
 * the block (by default {@link LanguageModels#of}: the compressed-MLA-cache decoder for DeepSeek).
 *
 * <p>DJL's predictor always runs the block once on what {@code processInput} returns; that pass is the prompt's
 * forward (the prefill, whose logits are not reused because the cached decoder fills its cache on its own prefill).
 * Servers that want to avoid the extra prefill call {@link Generator} directly.
 *
 * <pre>{@code
 * Model model = Model.newInstance("deepseek", device);
 * model.setBlock(deepSeekForCausalLM);
 * try (Predictor<GenerationRequest, GenerationResult> p = model.newPredictor(new GenerationTranslator(tokenizer))) {
 *     GenerationResult r = p.predict(GenerationRequest.builder().optText("Hello").setParams(SamplingParams.greedy(16)).build());
 * }
 * }</pre>
 */
public final class GenerationTranslator implements NoBatchifyTranslator<GenerationRequest, GenerationResult> {

    private static final String REQUEST = "memopt.generation.request";
    private static final String PROMPT = "memopt.generation.prompt";
    private static final String MODEL = "memopt.generation.model";

    private final TextTokenizer tokenizer;
    private final Function<Block, LanguageModel> languageModel;
    private final TokenListener listener;

    /** With the default {@link LanguageModels#of} and no streaming. */
    public GenerationTranslator(TextTokenizer tokenizer) {
        this(tokenizer, LanguageModels::of, null);
    }

    /**
     * @param tokenizer for text/chat prompts and text output; may be {@code null} for id-only requests
     * @param languageModel makes the decoder from the model's block
     * @param listener streaming callback, or {@code null}
     */
    public GenerationTranslator(TextTokenizer tokenizer, Function<Block, LanguageModel> languageModel, TokenListener listener) {
        this.tokenizer = tokenizer;
        this.languageModel = Preconditions.checkNotNull(languageModel, "languageModel");
        this.listener = listener;
    }

    @Override
    public NDList processInput(TranslatorContext ctx, GenerationRequest input) {
        LanguageModel lm = languageModel.apply(ctx.getBlock());
        long[] prompt = input.promptIds(tokenizer, lm.maxLength()); // refused before tokenizing what cannot fit
        ctx.setAttachment(REQUEST, input);
        ctx.setAttachment(PROMPT, prompt);
        ctx.setAttachment(MODEL, lm);
        NDManager m = ctx.getNDManager();
        long[] mask = new long[prompt.length];
        Arrays.fill(mask, 1);
        return new NDList(m.create(prompt, new Shape(1, prompt.length)), m.create(mask, new Shape(1, prompt.length)));
    }

    @Override
    public GenerationResult processOutput(TranslatorContext ctx, NDList list) {
        GenerationRequest request = (GenerationRequest) ctx.getAttachment(REQUEST);
        long[] prompt = (long[]) ctx.getAttachment(PROMPT);
        LanguageModel lm = (LanguageModel) ctx.getAttachment(MODEL);
        Generator generator = new Generator(lm, tokenizer);
        List<GenerationResult> results =
                generator.generate(ctx.getNDManager(), List.of(prompt), request.params(), listener, () -> Thread.currentThread().isInterrupted());
        return results.get(0);
    }
}
