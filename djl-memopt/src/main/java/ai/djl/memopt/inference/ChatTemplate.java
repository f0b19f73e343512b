package ai.djl.memopt.inference;

import com.google.common.base.Preconditions;
import com.hubspot.jinjava.Jinjava;
import com.hubspot.jinjava.JinjavaConfig;
import com.hubspot.jinjava.interpret.RenderResult;
import com.hubspot.jinjava.interpret.TemplateError;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.stream.Collectors;

/**
 * Renders a Hugging Face chat template (the Jinja {@code chat_template} of {@code tokenizer_config.json}) the way
 * transformers' {@code apply_chat_template(..., tokenize=False)} does: Jinja with {@code trim_blocks} and
 * {@code lstrip_blocks}, the variables {@code messages}, {@code bos_token}, {@code eos_token} and
 * {@code add_generation_prompt}.
 *
 * <pre>{@code
 * ChatTemplate t = ChatTemplate.of(templateText, "<bos>", "<eos>");
 * String prompt = t.render(List.of(ChatMessage.user("Hi")), true);
 * // tokenize prompt WITHOUT adding special tokens: the template already wrote bos_token
 * }</pre>
 */
public final class ChatTemplate {

    private final String template;
    private final String bosToken;
    private final String eosToken;
    private final Jinjava jinjava;

    private ChatTemplate(String template, String bosToken, String eosToken) {
        this.template = template;
        this.bosToken = bosToken;
        this.eosToken = eosToken;
        // transformers renders chat templates with trim_blocks=True, lstrip_blocks=True
        JinjavaConfig config =
                JinjavaConfig.newBuilder()
                        .withTrimBlocks(true)
                        .withLstripBlocks(true)
                        .withFailOnUnknownTokens(false)
                        .build();
        this.jinjava = new Jinjava(config);
    }

    /**
     * A template with its special tokens.
     *
     * @param template the Jinja source
     * @param bosToken the text of the BOS token ({@code ""} if the tokenizer has none)
     * @param eosToken the text of the EOS token ({@code ""} if the tokenizer has none)
     */
    public static ChatTemplate of(String template, String bosToken, String eosToken) {
        Preconditions.checkArgument(
                template != null && !template.isBlank(), "chat template must be non-empty Jinja text");
        return new ChatTemplate(template, Objects.requireNonNullElse(bosToken, ""), Objects.requireNonNullElse(eosToken, ""));
    }

    public String source() {
        return template;
    }

    /**
     * Renders the conversation.
     *
     * @param messages the conversation, in order
     * @param addGenerationPrompt whether to append the assistant prefix the model continues from
     * @throws IllegalArgumentException if the template fails to render (the Jinja error is in the message)
     */
    public String render(List<ChatMessage> messages, boolean addGenerationPrompt) {
        Preconditions.checkArgument(messages != null && !messages.isEmpty(), "a chat needs at least one message");
        List<Map<String, Object>> list = new ArrayList<>(messages.size());
        for (ChatMessage m : messages) {
            Map<String, Object> entry = new HashMap<>();
            entry.put("role", m.role());
            entry.put("content", m.content());
            list.add(entry);
        }
        Map<String, Object> context = new HashMap<>();
        context.put("messages", list);
        context.put("bos_token", bosToken);
        context.put("eos_token", eosToken);
        context.put("add_generation_prompt", addGenerationPrompt);
        RenderResult result = jinjava.renderForResult(template, context);
        List<TemplateError> fatal =
                result.getErrors().stream()
                        .filter(e -> e.getSeverity() == TemplateError.ErrorType.FATAL)
                        .collect(Collectors.toList());
        if (!fatal.isEmpty()) {
            throw new IllegalArgumentException(
                    "chat template failed to render: "
                            + fatal.stream().map(TemplateError::getMessage).collect(Collectors.joining("; ")));
        }
        return result.getOutput();
    }
}
