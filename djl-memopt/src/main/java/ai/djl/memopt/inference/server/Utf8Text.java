package ai.djl.memopt.inference.server;

import ai.djl.memopt.inference.TextTokenizer;
import java.nio.ByteBuffer;
import java.nio.CharBuffer;
import java.nio.charset.CharsetDecoder;
import java.nio.charset.CoderResult;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;

/** Strict UTF-8: a body with a malformed byte sequence, or a prompt with an unpaired surrogate, is refused (400). */
final class Utf8Text {

    private Utf8Text() {}

    /**
     * Decodes UTF-8, refusing malformed input.
     *
     * @throws ApiException 400 naming the byte offset of the first malformed sequence
     */
    static String decode(byte[] bytes, String what) {
        CharsetDecoder decoder =
                StandardCharsets.UTF_8.newDecoder()
                        .onMalformedInput(CodingErrorAction.REPORT)
                        .onUnmappableCharacter(CodingErrorAction.REPORT);
        ByteBuffer in = ByteBuffer.wrap(bytes);
        CharBuffer out = CharBuffer.allocate(bytes.length);
        CoderResult r = decoder.decode(in, out, true);
        if (r.isUnderflow()) {
            r = decoder.flush(out);
        }
        if (r.isError()) {
            int at = in.position();
            StringBuilder hex = new StringBuilder();
            for (int i = at; i < Math.min(bytes.length, at + r.length()); i++) {
                hex.append(hex.length() == 0 ? "" : " ").append(String.format("%02x", bytes[i] & 0xff));
            }
            throw ApiException.badRequest(null,
                    what + " is not valid UTF-8: malformed byte sequence " + hex + " at byte offset " + at);
        }
        out.flip();
        return out.toString();
    }

    /**
     * Checks that a text is Unicode (no unpaired surrogate, which a JSON {@code \\uXXXX} escape can write).
     *
     * @throws ApiException 400 for {@code param}, naming the character index
     */
    static void checkUnicode(String text, String param) {
        try {
            TextTokenizer.utf8Length(text);
        } catch (IllegalArgumentException e) {
            throw ApiException.badRequest(param, param + " holds an " + e.getMessage());
        }
    }
}
