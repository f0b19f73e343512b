package ai.djl.memopt.inference;

import ai.djl.Device;
import java.io.IOException;

/** Shared fakes for tests in other packages (server, CLI). */
public final class FakeLms {

    /** The DeepSeek-V3 vocabulary size, so real tokenizer ids fit. */
    public static final int BIG_VOCAB = 129280;

    private FakeLms() {}

    /** {@link FakeCausalLm} over the DeepSeek-V3 vocabulary, decoded without a cache. */
    public static LanguageModel bigVocab() {
        return new RecomputingLanguageModel(new FakeCausalLm(BIG_VOCAB), BIG_VOCAB, Device.cpu());
    }

    public static long[] greedyReference(long[] prompt, int n) {
        return FakeCausalLm.greedyReference(prompt, n, BIG_VOCAB);
    }

    public static TextTokenizer deepSeekTokenizer() throws IOException {
        return TextTokenizer.fromModelDir(TextTokenizerTest.deepSeekTokenizerDir());
    }

    /** The word-level test tokenizer over ids 0..511 ({@code w<i>}): one token per word, with no bound per token. */
    public static TextTokenizer wordLevelTokenizer() throws IOException {
        return TextTokenizer.fromModelDir(TextTokenizerTest.tokenizerDir("wordlevel-512"));
    }
}
