package ai.djl.memopt.inference;

import com.google.common.base.Preconditions;
import java.util.Objects;

/**
 * One message of a chat conversation, as the {@code messages} list of a Hugging Face chat template sees it.
 *
 * @param role {@code system}, {@code user}, {@code assistant} or {@code tool}
 * @param content the message text
 */
public record ChatMessage(String role, String content) {

    public ChatMessage {
        Objects.requireNonNull(role, "role");
        Objects.requireNonNull(content, "content");
        Preconditions.checkArgument(!role.isBlank(), "chat message role must not be blank");
    }

    public static ChatMessage system(String content) {
        return new ChatMessage("system", content);
    }

    public static ChatMessage user(String content) {
        return new ChatMessage("user", content);
    }

    public static ChatMessage assistant(String content) {
        return new ChatMessage("assistant", content);
    }
}
