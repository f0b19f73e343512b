package ai.djl.memopt.nn;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.ndarray.NDManager;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** Exclusive per-phase accounting of {@link PhaseTimer}, and its no-op when off. */
class PhaseTimerTest {

    @Test
    void nestedPhasesAreChargedExclusivelyAndEveryMomentOnce() throws Exception {
        assertFalse(PhaseTimer.isActive());
        PhaseTimer.phase("ignored").close(); // no timer: a no-op
        try (NDManager m = NDManager.newBaseManager()) {
            long t0 = System.nanoTime();
            PhaseTimer timer = PhaseTimer.start(m);
            assertThrows(IllegalStateException.class, () -> PhaseTimer.start(m), "one timer per thread");
            try (PhaseTimer.Phase outer = PhaseTimer.phase("outer")) {
                try (PhaseTimer.Phase inner = PhaseTimer.phase("inner")) {
                    Thread.sleep(60);
                }
            }
            try (PhaseTimer.Phase outer = PhaseTimer.phase("outer")) {
                outer.getClass(); // entered twice, nothing of its own
            }
            Map<String, Long> entries = timer.entries();
            Map<String, Double> seconds = timer.stop();
            double wall = (System.nanoTime() - t0) / 1e9;
            assertFalse(PhaseTimer.isActive());
            assertEquals(List.of(PhaseTimer.OTHER, "outer", "inner"), List.copyOf(seconds.keySet()));
            assertEquals(2L, entries.get("outer"));
            assertEquals(1L, entries.get("inner"));
            assertTrue(seconds.get("inner") >= 0.06, seconds.toString());
            assertTrue(seconds.get("outer") < 0.03, "the inner phase's sleep is not the outer's: " + seconds);
            double sum = seconds.values().stream().mapToDouble(Double::doubleValue).sum();
            assertTrue(sum <= wall && sum >= seconds.get("inner"), sum + " of " + wall + ": " + seconds);
        }
    }
}
