package ai.djl.memopt.inference;

import java.util.List;

/**
 * Follows one sequence's decoded text: finds the first stop string, and decides how much text is final enough to
 * stream (text that could still become a stop string, or ends in an incomplete UTF-8 character, is held back). The
 * deltas it returns concatenate to exactly {@link #finalText()}.
 */
final class StopTextTracker {

    private static final char REPLACEMENT = '\uFFFD';

    private final List<String> stops;
    private String visible = "";
    private int emitted;
    private boolean stopped;

    StopTextTracker(List<String> stops) {
        this.stops = stops;
    }

    /** Updates with the whole decoded text so far and returns the newly final text. */
    String update(String text) {
        int cut = -1;
        for (String s : stops) {
            int idx = text.indexOf(s);
            if (idx >= 0 && (cut < 0 || idx < cut)) {
                cut = idx;
            }
        }
        if (cut >= 0) {
            stopped = true;
            visible = text.substring(0, cut);
            return flush();
        }
        int hold = 0;
        for (String s : stops) {
            for (int k = Math.min(s.length() - 1, text.length()); k > hold; k--) {
                if (text.regionMatches(text.length() - k, s, 0, k)) {
                    hold = k;
                    break;
                }
            }
        }
        int end = text.length() - hold;
        while (end > 0 && text.charAt(end - 1) == REPLACEMENT) {
            end--; // a multi-byte character split across tokens decodes to U+FFFD until its last byte arrives
        }
        visible = text;
        return delta(text.substring(0, end));
    }

    /** The sequence ended (EOS, length, cancel): everything not yet streamed. */
    String finish() {
        return flush();
    }

    private String flush() {
        return delta(visible);
    }

    private String delta(String upTo) {
        if (upTo.length() <= emitted) {
            return "";
        }
        String d = upTo.substring(emitted);
        emitted = upTo.length();
        return d;
    }

    boolean stopped() {
        return stopped;
    }

    String finalText() {
        return visible;
    }
}
