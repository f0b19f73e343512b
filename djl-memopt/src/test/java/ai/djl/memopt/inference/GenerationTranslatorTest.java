package ai.djl.memopt.inference;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import ai.djl.Device;
import ai.djl.Model;
import ai.djl.inference.Predictor;
import ai.djl.translate.TranslateException;
import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

@ExtendWith(OneThread.class)
class GenerationTranslatorTest {

    /** The DeepSeek-V3 vocabulary size, so chat-template token ids are valid for the fake model. */
    static final int VOCAB = 129280;

    @Test
    void predictorGeneratesFromIdsTextAndChat() throws IOException, TranslateException {
        try (TextTokenizer tok = TextTokenizer.fromModelDir(TextTokenizerTest.deepSeekTokenizerDir());
                Model model = Model.newInstance("fake-lm", Device.cpu())) {
            model.setBlock(new FakeCausalLm(VOCAB));
            List<Long> streamed = new ArrayList<>();
            GenerationTranslator translator =
                    new GenerationTranslator(
                            tok, b -> new RecomputingLanguageModel(b, VOCAB, Device.cpu()), (i, id, d) -> streamed.add(id));
            SamplingParams params = SamplingParams.builder().setMaxNewTokens(6).optIgnoreEos(true).build();
            try (Predictor<GenerationRequest, GenerationResult> p = model.newPredictor(translator)) {
                long[] ids = {17, 3, 40};
                GenerationResult r = p.predict(GenerationRequest.builder().optPromptIds(ids).setParams(params).build());
                assertArrayEquals(FakeCausalLm.greedyReference(ids, 6, VOCAB), r.outputIds());
                assertEquals(r.outputIdList(), streamed);
                assertEquals(tok.decode(r.outputIds(), true), r.text());
                assertEquals(FinishReason.LENGTH, r.finishReason());

                r = p.predict(GenerationRequest.builder().optText("Q").setParams(params).build());
                assertArrayEquals(new long[] {0, 51}, r.promptIds()); // BOS + 'Q'
                assertArrayEquals(FakeCausalLm.greedyReference(new long[] {0, 51}, 6, VOCAB), r.outputIds());

                r = p.predict(GenerationRequest.builder().optMessages(List.of(ChatMessage.user("Q"))).setParams(params).build());
                long[] chat = {0, 128803, 51, 128804}; // BOS <｜User｜> Q <｜Assistant｜>
                assertArrayEquals(chat, r.promptIds());
                assertArrayEquals(FakeCausalLm.greedyReference(chat, 6, VOCAB), r.outputIds());
            }
        }
    }

    @Test
    void predictorOverTheDeepSeekBlockUsesTheCachedDecoder() throws IOException, TranslateException {
        java.nio.file.Path dir = MlaCachedDecoderTest.fixture("tiny-deepseek-v3");
        long[] prompt = {451, 340, 497, 361, 133, 474};
        long[] greedy = {198, 191, 59, 261, 76, 152, 157, 372, 445, 269, 301, 152, 157, 372, 445, 269}; // transformers
        try (TestModel loaded =
                        TestModel.load(dir, ai.djl.ndarray.types.DataType.FLOAT32);
                Model model = Model.newInstance("tiny-deepseek-v3", Device.cpu())) {
            model.setBlock(loaded.model());
            try (Predictor<GenerationRequest, GenerationResult> p = model.newPredictor(new GenerationTranslator(null))) {
                SamplingParams params =
                        SamplingParams.builder().setMaxNewTokens(16).optEosTokenIds(TextTokenizer.readEosIds(dir)).build();
                GenerationResult r = p.predict(GenerationRequest.builder().optPromptIds(prompt).setParams(params).build());
                assertArrayEquals(greedy, r.outputIds());
                assertEquals(null, r.text());
            }
        }
    }

    @Test
    void predictorKeepsWorkingAfterTheExpertsAreStacked() throws IOException, TranslateException {
        // the predictor's parameter store caches the weight arrays at the first predict; the gathered decoder then
        // stacks the experts under those same array objects, and the second predict runs the block on them again
        java.nio.file.Path dir = MlaCachedDecoderTest.fixture("tiny-deepseek-v3");
        long[] prompt = {451, 340, 497, 361, 133, 474};
        long[] greedy = {198, 191, 59, 261, 76, 152, 157, 372, 445, 269, 301, 152, 157, 372, 445, 269}; // transformers
        try (TestModel loaded = TestModel.load(dir, ai.djl.ndarray.types.DataType.FLOAT32);
                Model model = Model.newInstance("tiny-deepseek-v3", Device.cpu())) {
            model.setBlock(loaded.model());
            GenerationTranslator translator = new GenerationTranslator(null,
                    b -> new MlaCachedDecoder((ai.djl.memopt.model.deepseek.DeepSeekForCausalLM) b, Device.cpu(),
                            ExpertDispatch.GATHERED), null);
            try (Predictor<GenerationRequest, GenerationResult> p = model.newPredictor(translator)) {
                SamplingParams params = SamplingParams.builder().setMaxNewTokens(16).optIgnoreEos(true).build();
                for (int i = 0; i < 2; i++) {
                    GenerationResult r = p.predict(GenerationRequest.builder().optPromptIds(prompt).setParams(params).build());
                    assertArrayEquals(greedy, r.outputIds(), "predict " + i);
                }
            }
        }
    }

    @Test
    void requestValidation() {
        SamplingParams params = SamplingParams.greedy(2);
        assertThrows(IllegalArgumentException.class, () -> GenerationRequest.builder().setParams(params).build());
        assertThrows(
                IllegalArgumentException.class,
                () -> GenerationRequest.builder().optText("a").optPromptIds(new long[] {1}).setParams(params).build());
        assertThrows(IllegalArgumentException.class, () -> GenerationRequest.builder().optText("a").build());
        GenerationRequest text = GenerationRequest.builder().optText("a").setParams(params).build();
        assertThrows(IllegalArgumentException.class, () -> text.promptIds(null));
    }
}
