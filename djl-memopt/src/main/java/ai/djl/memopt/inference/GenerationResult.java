package ai.djl.memopt.inference;

import com.google.common.primitives.Longs;
import java.util.List;

/**
 * The outcome of generating from one prompt.
 *
 * @param text the new text (special tokens skipped, cut before a stop string); {@code null} without a tokenizer
 * @param promptIds the prompt's token ids
 * @param outputIds the new token ids (an EOS that ended the sequence is included, as transformers does)
 * @param finishReason why it stopped
 */
public record GenerationResult(String text, long[] promptIds, long[] outputIds, FinishReason finishReason) {

    public List<Long> outputIdList() {
        return Longs.asList(outputIds);
    }

    public List<Long> promptIdList() {
        return Longs.asList(promptIds);
    }
}
