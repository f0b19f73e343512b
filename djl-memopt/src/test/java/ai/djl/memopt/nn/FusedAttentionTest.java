package ai.djl.memopt.nn;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.engine.Engine;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/** The fused kernel against the textbook formula, and its switch. (Gradients: MultiHeadLatentAttentionTest.) */
class FusedAttentionTest {

    @AfterEach
    void clear() {
        System.clearProperty(FusedAttention.KERNEL_PROPERTY);
    }

    @Test
    void causalEqualsSoftmaxOfMaskedScores() {
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            Engine.getInstance().setRandomSeed(3);
            long t = 9;
            NDArray q = m.randomNormal(new Shape(1, 2, t, 6));
            NDArray k = m.randomNormal(new Shape(1, 2, t, 6));
            NDArray v = m.randomNormal(new Shape(1, 2, t, 4));
            float scale = 0.37f;
            NDArray scores = q.matMul(k.transpose(0, 1, 3, 2)).mul(scale); // (1, 2, T, T)
            NDArray future = m.arange(0, (int) t, 1, DataType.INT32).reshape(1, t)
                    .gt(m.arange(0, (int) t, 1, DataType.INT32).reshape(t, 1)); // key after query
            NDArray expected = scores.add(future.toType(DataType.FLOAT32, false).mul(-1e30f)).softmax(-1).matMul(v);
            NDArray actual = FusedAttention.causal(q, k, v, scale);
            assertEquals(expected.getShape(), actual.getShape());
            float[] e = expected.toFloatArray();
            float[] a = actual.toFloatArray();
            for (int i = 0; i < e.length; i++) {
                assertEquals(e[i], a[i], 1e-5, "element " + i);
            }
            // the first query sees only the first key: its output is the first value row
            assertEquals(v.get("0, 0, 0").getFloat(0), actual.get("0, 0, 0").getFloat(0), 1e-6);
        }
    }

    @Test
    void scopedCallsLeaveNoArraysBehind() {
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            NDArray q = m.randomNormal(new Shape(1, 2, 5, 4));
            NDArray v = m.randomNormal(new Shape(1, 2, 5, 3));
            int before = m.getManagedArrays().size();
            for (int i = 0; i < 20; i++) {
                try (NDScope scope = new NDScope()) {
                    FusedAttention.causal(q, q, v, 0.5f).sum();
                    scope.suppressNotUsedWarning();
                }
            }
            assertEquals(before, m.getManagedArrays().size(), "arrays left by 20 scoped calls");
        }
    }

    @Test
    void propertyChoosesTheKernel() {
        assertFalse(FusedAttention.enabled(Device.cpu()), "eager on the CPU by default");
        assertTrue(FusedAttention.enabled(Device.gpu()), "fused on a GPU by default");
        System.setProperty(FusedAttention.KERNEL_PROPERTY, "FUSED");
        assertTrue(FusedAttention.enabled(Device.cpu()));
        System.setProperty(FusedAttention.KERNEL_PROPERTY, "eager");
        assertFalse(FusedAttention.enabled(Device.gpu()));
        System.setProperty(FusedAttention.KERNEL_PROPERTY, "flash");
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> FusedAttention.enabled(Device.cpu()));
        assertTrue(e.getMessage().contains("'flash'") && e.getMessage().contains(FusedAttention.KERNEL_PROPERTY),
                e.getMessage());
    }

    @Test
    void rejectsKeysOfAnotherLength() {
        try (NDManager m = NDManager.newBaseManager(Device.cpu())) {
            NDArray q = m.zeros(new Shape(1, 2, 3, 4));
            NDArray k = m.zeros(new Shape(1, 2, 5, 4));
            IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                    () -> FusedAttention.causal(q, k, k, 0.5f));
            assertTrue(e.getMessage().contains("(1, 2, 5, 4)"), e.getMessage());
        }
    }
}
