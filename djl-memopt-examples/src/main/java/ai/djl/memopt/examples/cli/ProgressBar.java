package ai.djl.memopt.examples.cli;

import java.io.PrintStream;
import java.util.Locale;
import java.util.function.LongSupplier;

/**
 * A one-line progress bar on stderr, redrawn with a carriage return:
 * {@code label [=====>    ] 12/40 status  (0:15, ETA 0:50)}: the elapsed time and the time left.
 *
 * <p>The ETA is the time per unit measured from the first update to the latest, times the units left: the first
 * update's work (JIT and libtorch warm-up, or the steps a resumed run already had) does not skew it. Until two updates
 * have been seen it reads {@code ETA --:--}.
 */
public final class ProgressBar {

    private static final int WIDTH = 24;
    private final PrintStream err;
    private final String label;
    private final long total;
    private final LongSupplier nanoClock;
    private final long startNanos;
    private long firstDone = -1;
    private long firstNanos;
    private int lastLength;

    public ProgressBar(PrintStream err, String label, long total) {
        this(err, label, total, System::nanoTime);
    }

    /** With the clock to read (tests pass a fake one). */
    ProgressBar(PrintStream err, String label, long total, LongSupplier nanoClock) {
        this.err = err;
        this.label = label.isEmpty() ? "" : label + " ";
        this.total = Math.max(1, total);
        this.nanoClock = nanoClock;
        this.startNanos = nanoClock.getAsLong();
    }

    /** Redraws the bar at {@code done} of the total, followed by a status text. */
    public void update(long done, String status) {
        long now = nanoClock.getAsLong();
        if (firstDone < 0) {
            firstDone = done;
            firstNanos = now;
        }
        int filled = (int) Math.min(WIDTH, WIDTH * Math.max(0, done) / total);
        StringBuilder bar = new StringBuilder(WIDTH);
        for (int i = 0; i < WIDTH; i++) {
            bar.append(i < filled ? '=' : (i == filled ? '>' : ' '));
        }
        String eta;
        if (done >= total) {
            eta = "done";
        } else if (done > firstDone) {
            double perUnit = (now - firstNanos) / (double) (done - firstDone);
            eta = "ETA " + clock((long) (perUnit * (total - done)));
        } else {
            eta = "ETA --:--";
        }
        String line = String.format(Locale.ROOT, "%s[%s] %d/%d %s  (%s, %s)", label, bar, done, total, status,
                clock(now - startNanos), eta);
        // pad over the end of a longer previous line
        int pad = Math.max(0, lastLength - line.length());
        lastLength = line.length();
        err.print("\r" + line + " ".repeat(pad));
        err.flush();
    }

    /** Ends the line. */
    public void finish() {
        err.println();
    }

    /** Elapsed time since the bar was made, as {@code m:ss} (or {@code h:mm:ss}). */
    public String elapsed() {
        return clock(nanoClock.getAsLong() - startNanos);
    }

    /** {@code m:ss}, or {@code h:mm:ss} from an hour on. */
    static String clock(long nanos) {
        long s = Math.max(0, Math.round(nanos / 1e9));
        return s >= 3600 ? String.format(Locale.ROOT, "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60)
                : String.format(Locale.ROOT, "%d:%02d", s / 60, s % 60);
    }
}
