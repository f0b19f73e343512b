package ai.djl.memopt.examples.cli;

import java.io.PrintStream;
import java.util.Locale;

/** A one-line progress bar on stderr, redrawn with a carriage return: {@code label [=====>    ] 12/40 status}. */
public final class ProgressBar {

    private static final int WIDTH = 24;
    private final PrintStream err;
    private final String label;
    private final long total;

    public ProgressBar(PrintStream err, String label, long total) {
        this.err = err;
        this.label = label.isEmpty() ? "" : label + " ";
        this.total = Math.max(1, total);
    }

    /** Redraws the bar at {@code done} of the total, followed by a status text. */
    public void update(long done, String status) {
        int filled = (int) Math.min(WIDTH, WIDTH * done / total);
        StringBuilder bar = new StringBuilder(WIDTH);
        for (int i = 0; i < WIDTH; i++) {
            bar.append(i < filled ? '=' : (i == filled ? '>' : ' '));
        }
        err.printf(Locale.ROOT, "\r%s[%s] %d/%d %s", label, bar, done, total, status);
        err.flush();
    }

    /** Ends the line. */
    public void finish() {
        err.println();
    }
}
