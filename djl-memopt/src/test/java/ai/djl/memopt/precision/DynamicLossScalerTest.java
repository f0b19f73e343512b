package ai.djl.memopt.precision;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.Map;
import org.junit.jupiter.api.Test;

class DynamicLossScalerTest {

    @Test
    void defaultsFollowGradScaler() {
        DynamicLossScaler s = DynamicLossScaler.create();
        assertEquals(65536f, s.getScale());
        for (int i = 0; i < 1999; i++) {
            assertTrue(s.update(false));
        }
        assertEquals(65536f, s.getScale());
        assertTrue(s.update(false));
        assertEquals(131072f, s.getScale(), "x2 after 2000 clean steps");
        assertFalse(s.update(true));
        assertEquals(65536f, s.getScale(), "x0.5 on overflow");
        assertEquals(0, s.getCleanSteps());
        assertEquals(1, s.getSkippedSteps());
        assertEquals(2001, s.getSteps());
    }

    @Test
    void boundsAreRespected() {
        DynamicLossScaler s = DynamicLossScaler.builder().optInitialScale(4).optMinScale(2).optMaxScale(8)
                .optGrowthInterval(1).build();
        s.update(false);
        s.update(false);
        assertEquals(8f, s.getScale());
        s.update(true);
        s.update(true);
        s.update(true);
        assertEquals(2f, s.getScale());
    }

    @Test
    void stateRoundTrips() {
        DynamicLossScaler s = DynamicLossScaler.builder().optGrowthInterval(3).optBackoffFactor(0.25f).build();
        s.update(false);
        s.update(true);
        s.update(false);
        s.update(false);
        DynamicLossScaler r = DynamicLossScaler.fromJson(s.toJson());
        assertEquals(s.state(), r.state());
        // and the restored scaler behaves like the original
        assertEquals(s.update(false), r.update(false));
        assertEquals(s.getScale(), r.getScale());
        assertEquals(32768f, r.getScale());
        Map<String, String> m = DynamicLossScaler.restore(s.state()).state();
        assertEquals(s.state(), m);
    }

    @Test
    void badStateAndOptionsAreRejected() {
        Map<String, String> state = new java.util.HashMap<>(DynamicLossScaler.create().state());
        state.remove("scale");
        IllegalArgumentException e =
                assertThrows(IllegalArgumentException.class, () -> DynamicLossScaler.restore(state));
        assertTrue(e.getMessage().contains("'scale'"), e.getMessage());
        state.put("scale", "abc");
        e = assertThrows(IllegalArgumentException.class, () -> DynamicLossScaler.restore(state));
        assertTrue(e.getMessage().contains("abc"), e.getMessage());
        assertThrows(IllegalArgumentException.class, () -> DynamicLossScaler.fromJson("[1,2]"));
        assertThrows(IllegalArgumentException.class,
                () -> DynamicLossScaler.builder().optBackoffFactor(1.5f).build());
        assertThrows(IllegalArgumentException.class,
                () -> DynamicLossScaler.builder().optInitialScale(Float.POSITIVE_INFINITY).build());
    }
}
