package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import org.junit.jupiter.api.Test;

class ProgressBarTest {

    private long now;

    @Test
    void showsElapsedTimeAndAnEtaFromTheRateSinceTheFirstUpdate() {
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        PrintStream err = new PrintStream(bytes, true, StandardCharsets.UTF_8);
        now = 0;
        ProgressBar bar = new ProgressBar(err, "train", 100, () -> now);

        now = 30_000_000_000L; // the first step took 30 s (warm-up): no rate yet
        bar.update(1, "loss 6.9");
        assertTrue(last(bytes).endsWith("1/100 loss 6.9  (0:30, ETA --:--)"), last(bytes));

        now = 50_000_000_000L; // 10 more steps in 20 s: 2 s a step, 89 left
        bar.update(11, "loss 5.0");
        assertTrue(last(bytes).endsWith("11/100 loss 5.0  (0:50, ETA 2:58)"), last(bytes));

        now = 4000_000_000_000L; // past an hour: h:mm:ss
        bar.update(60, "x");
        assertTrue(last(bytes).contains("60/100 x  (1:06:40, ETA "), last(bytes));

        bar.update(100, "");
        assertTrue(last(bytes).contains("[========================] 100/100   (1:06:40, done)"), last(bytes));
    }

    @Test
    void aShorterLineOverwritesTheEndOfTheLongerOneBeforeIt() {
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        PrintStream err = new PrintStream(bytes, true, StandardCharsets.UTF_8);
        ProgressBar bar = new ProgressBar(err, "", 4, () -> now);
        bar.update(0, "a long status text");
        String first = last(bytes);
        bar.update(1, "short");
        assertEquals(first.length(), last(bytes).length(), "padded to the previous line's length");
    }

    @Test
    void clockFormats() {
        assertEquals("0:00", ProgressBar.clock(0));
        assertEquals("1:05", ProgressBar.clock(65_000_000_000L));
        assertEquals("2:00:00", ProgressBar.clock(7200_000_000_000L));
    }

    /** The last redraw (text after the last carriage return). */
    private static String last(ByteArrayOutputStream bytes) {
        String s = bytes.toString(StandardCharsets.UTF_8);
        return s.substring(s.lastIndexOf('\r') + 1);
    }
}
