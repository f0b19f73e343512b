package ai.djl.memopt.inference;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.List;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

class ChatTemplateTest {

    static final String BOS = "<｜begin▁of▁sentence｜>";
    static final String EOS = "<｜end▁of▁sentence｜>";
    static ChatTemplate deepSeekV3;

    @BeforeAll
    static void load() throws IOException {
        String json =
                Files.readString(
                        TextTokenizerTest.deepSeekTokenizerDir().resolve("tokenizer_config.json"), StandardCharsets.UTF_8);
        String template = JsonParser.parseString(json).getAsJsonObject().get("chat_template").getAsString();
        deepSeekV3 = ChatTemplate.of(template, BOS, EOS);
    }

    @Test
    void systemUserAssistantWithGenerationPrompt() {
        // by hand from the template: BOS, then the system prompt(s) before everything, then each user turn as
        // '<｜User｜>'+content, each assistant turn as '<｜Assistant｜>'+content+EOS, then '<｜Assistant｜>'
        String out =
                deepSeekV3.render(
                        List.of(
                                ChatMessage.system("You are a helpful assistant."),
                                ChatMessage.user("Hello!"),
                                ChatMessage.assistant("Hi there."),
                                ChatMessage.user("What is 2+2?")),
                        true);
        assertEquals(
                BOS
                        + "You are a helpful assistant.<｜User｜>Hello!<｜Assistant｜>Hi there."
                        + EOS
                        + "<｜User｜>What is 2+2?<｜Assistant｜>",
                out);
    }

    @Test
    void severalSystemMessagesJoinWithBlankLineAndNoGenerationPrompt() {
        String out =
                deepSeekV3.render(
                        List.of(ChatMessage.system("A"), ChatMessage.system("B"), ChatMessage.user("Q")), false);
        assertEquals(BOS + "A\n\nB<｜User｜>Q", out);
    }

    @Test
    void trimAndLstripBlocksLikeTransformers() {
        // transformers renders with trim_blocks and lstrip_blocks: the newline after a block tag and the indentation
        // before it disappear
        ChatTemplate t =
                ChatTemplate.of("{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}", "", "");
        assertEquals("[a]\n[b]\n", t.render(List.of(ChatMessage.user("a"), ChatMessage.user("b")), false));
    }

    @Test
    void spacesBeforeATagInsideALineAreKeptAsJinja2Does() {
        // Jinjava's own lstrip_blocks would drop the space before {% endfor %}; Jinja2 (python, 3.1.6) gives this:
        ChatTemplate t =
                ChatTemplate.of(
                        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                                + "{% if add_generation_prompt %}assistant{% endif %}",
                        "<s>",
                        "</s>");
        assertEquals("<s>user w7 assistant", t.render(List.of(ChatMessage.user("w7")), true));
    }

    @Test
    void whitespaceRulesOnTheSource() {
        assertEquals("{% if x %}a{% endif %}", ChatTemplate.jinja2Whitespace("{% if x %}\na{% endif %}\n"));
        assertEquals("x{% if y %}", ChatTemplate.jinja2Whitespace("x\n  {% if y %}\n").replace("\n", ""));
        assertEquals("a\n{% if y %}b", ChatTemplate.jinja2Whitespace("a\n  \t{% if y %}\nb"));
        assertEquals("a  {% if y %}\nb", ChatTemplate.jinja2Whitespace("a  {%+ if y +%}\nb"));
        assertEquals("{%- if y -%}\nb", ChatTemplate.jinja2Whitespace("{%- if y -%}\nb")); // Jinjava handles '-'
        assertEquals("{# c #}b", ChatTemplate.jinja2Whitespace("  {# c #}\nb"));
    }

    @Test
    void brokenTemplateIsAClearError() {
        ChatTemplate t = ChatTemplate.of("{% for m in messages %}{{ m.content }}", "", "");
        assertThrows(IllegalArgumentException.class, () -> t.render(List.of(ChatMessage.user("a")), false));
    }
}
