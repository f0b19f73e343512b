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
import java.util.regex.Matcher;
import java.util.regex.Pattern;
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

    private static final Pattern TAG = Pattern.compile("\\{([%#])(.*?)\\1\\}", Pattern.DOTALL);

    private final String template;
    private final String compiled;
    private final String bosToken;
    private final String eosToken;
    private final Jinjava jinjava;

    private ChatTemplate(String template, String bosToken, String eosToken) {
        this.template = template;
        this.compiled = jinja2Whitespace(template);
        this.bosToken = bosToken;
        this.eosToken = eosToken;
        // Jinjava's own lstripBlocks also strips spaces before a tag in the middle of a line, which Jinja2 does not:
        // the whitespace rules are applied to the source above, Jinja2's way, instead
        JinjavaConfig config = JinjavaConfig.newBuilder().withFailOnUnknownTokens(false).build();
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
     * Applies Jinja2's {@code lstrip_blocks} (spaces and tabs between the start of a line and a block or comment tag
     * are removed, unless the tag opens with {@code +}) and {@code trim_blocks} (the first newline after a block or
     * comment tag is removed, unless it closes with {@code +} or {@code -}) to the template source.
     */
    static String jinja2Whitespace(String src) {
        StringBuilder out = new StringBuilder(src.length());
        Matcher m = TAG.matcher(src);
        int pos = 0;
        boolean trimNext = false;
        while (m.find()) {
            String before = src.substring(pos, m.start());
            String inner = m.group(2);
            if (!inner.startsWith("+") && !inner.startsWith("-")) {
                int nl = before.lastIndexOf('\n');
                // the line must start in this stretch of text (or be the template's first line)
                if (nl >= 0 || pos == 0) {
                    String lead = before.substring(nl + 1);
                    if (lead.chars().allMatch(c -> c == ' ' || c == '\t')) {
                        before = before.substring(0, nl + 1);
                    }
                }
            }
            if (trimNext) {
                before = dropLeadingNewline(before);
            }
            out.append(before);
            String open = "{" + m.group(1);
            String close = m.group(1) + "}";
            String body = inner;
            if (body.startsWith("+")) {
                body = body.substring(1); // Jinjava does not know the '+' modifiers; their effect is applied here
            }
            boolean keepNewline = body.endsWith("+");
            if (keepNewline) {
                body = body.substring(0, body.length() - 1);
            }
            out.append(open).append(body).append(close);
            trimNext = !keepNewline && !inner.endsWith("-");
            pos = m.end();
        }
        String rest = src.substring(pos);
        out.append(trimNext ? dropLeadingNewline(rest) : rest);
        return out.toString();
    }

    private static String dropLeadingNewline(String s) {
        if (s.startsWith("\r\n")) {
            return s.substring(2);
        }
        return s.startsWith("\n") ? s.substring(1) : s;
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
        RenderResult result = jinjava.renderForResult(compiled, context);
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
