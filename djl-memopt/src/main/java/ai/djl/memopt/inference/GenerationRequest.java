package ai.djl.memopt.inference;

import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.List;
import java.util.Optional;

/**
 * What to generate from: exactly one of a text prompt, prompt token ids, or chat messages (rendered with the model's
 * chat template), plus {@link SamplingParams}. Immutable.
 *
 * <pre>{@code
 * GenerationRequest r = GenerationRequest.builder()
 *         .optMessages(List.of(ChatMessage.user("Hi")))
 *         .setParams(SamplingParams.greedy(64))
 *         .build();
 * }</pre>
 */
public final class GenerationRequest {

    private final String text;
    private final long[] promptIds;
    private final List<ChatMessage> messages;
    private final SamplingParams params;

    private GenerationRequest(Builder b) {
        this.text = b.text;
        this.promptIds = b.promptIds == null ? null : b.promptIds.clone();
        this.messages = b.messages == null ? null : ImmutableList.copyOf(b.messages);
        this.params = b.params;
    }

    public static Builder builder() {
        return new Builder();
    }

    public Optional<String> text() {
        return Optional.ofNullable(text);
    }

    public Optional<long[]> promptIds() {
        return Optional.ofNullable(promptIds).map(long[]::clone);
    }

    public Optional<List<ChatMessage>> messages() {
        return Optional.ofNullable(messages);
    }

    public SamplingParams params() {
        return params;
    }

    /**
     * The prompt as token ids.
     *
     * @param tokenizer needed for text and chat prompts
     * @throws IllegalArgumentException if the prompt needs a tokenizer (or a chat template) that is missing
     */
    public long[] promptIds(TextTokenizer tokenizer) {
        if (promptIds != null) {
            return promptIds.clone();
        }
        Preconditions.checkArgument(tokenizer != null, "a text or chat prompt needs a tokenizer (give token ids instead)");
        if (text != null) {
            return tokenizer.encode(text);
        }
        Preconditions.checkArgument(
                tokenizer.chatTemplate().isPresent(), "the model's tokenizer_config.json has no chat_template");
        return tokenizer.encodeChat(messages, true);
    }

    /**
     * The prompt as token ids, refused if it leaves no room for {@code maxNewTokens} in a context of
     * {@code contextLength} tokens. A text prompt that is certainly too long is refused without tokenizing it
     * ({@link TextTokenizer#encode(String, boolean, int)}).
     *
     * @throws ContextLengthException if prompt + {@code params().maxNewTokens()} exceed {@code contextLength}
     */
    public long[] promptIds(TextTokenizer tokenizer, int contextLength) {
        int maxNew = params.maxNewTokens();
        if (promptIds != null) {
            long total = (long) promptIds.length + maxNew;
            if (total > contextLength) {
                throw new ContextLengthException(total, contextLength,
                        "prompt (" + promptIds.length + " tokens) + max new tokens (" + maxNew + ") = " + total
                                + " tokens exceed the model's context of " + contextLength + " tokens (max_position_embeddings)");
            }
            return promptIds.clone();
        }
        int room = contextLength - maxNew;
        if (room < 1) {
            throw new ContextLengthException(1L + maxNew, contextLength,
                    "max new tokens (" + maxNew + ") leave no room for a prompt in the model's context of " + contextLength
                            + " tokens (max_position_embeddings)");
        }
        Preconditions.checkArgument(tokenizer != null, "a text or chat prompt needs a tokenizer (give token ids instead)");
        try {
            if (text != null) {
                return tokenizer.encode(text, true, room);
            }
            Preconditions.checkArgument(
                    tokenizer.chatTemplate().isPresent(), "the model's tokenizer_config.json has no chat_template");
            return tokenizer.encodeChat(messages, true, room);
        } catch (ContextLengthException e) {
            throw new ContextLengthException(e.tokens() + maxNew, contextLength,
                    "prompt + max new tokens (" + maxNew + ") exceed the model's context of " + contextLength
                            + " tokens (max_position_embeddings): " + e.getMessage());
        }
    }

    /** Builder for {@link GenerationRequest}. */
    public static final class Builder {
        private String text;
        private long[] promptIds;
        private List<ChatMessage> messages;
        private SamplingParams params;

        private Builder() {}

        public Builder optText(String text) {
            this.text = text;
            return this;
        }

        public Builder optPromptIds(long[] promptIds) {
            this.promptIds = promptIds;
            return this;
        }

        public Builder optMessages(List<ChatMessage> messages) {
            this.messages = messages;
            return this;
        }

        /** Required. */
        public Builder setParams(SamplingParams params) {
            this.params = params;
            return this;
        }

        public GenerationRequest build() {
            int given = (text != null ? 1 : 0) + (promptIds != null ? 1 : 0) + (messages != null ? 1 : 0);
            Preconditions.checkArgument(given == 1, "give exactly one of text, prompt ids or messages (got %s)", given);
            Preconditions.checkArgument(promptIds == null || promptIds.length > 0, "prompt ids must not be empty");
            Preconditions.checkArgument(messages == null || !messages.isEmpty(), "messages must not be empty");
            Preconditions.checkArgument(params != null, "sampling params are required");
            return new GenerationRequest(this);
        }
    }
}
