package ai.djl.memopt.quantize;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Parameter;
import ai.djl.nn.SequentialBlock;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

class PrunerTest {

    private static NDManager manager;

    @BeforeAll
    static void setUp() {
        manager = NDManager.newBaseManager();
    }

    @AfterAll
    static void tearDown() {
        manager.close();
    }

    private static Map<String, float[]> weights(SequentialBlock b) {
        Map<String, float[]> out = new java.util.LinkedHashMap<>();
        for (Map.Entry<String, Parameter> p : BlockTrees.parameters(b).entrySet()) {
            if (p.getKey().endsWith("weight")) {
                out.put(p.getKey(), p.getValue().getArray().toFloatArray());
            }
        }
        return out;
    }

    @Test
    void unstructuredPerLayerIsExactAndDropsTheSmallest() {
        try (NDManager m = manager.newSubManager()) {
            SequentialBlock b = QuantizerTest.mlp(m, 21);
            Map<String, float[]> before = weights(b);
            PruningReport r = Pruner.prune(b, PruningConfig.unstructured(0.3));
            Map<String, float[]> after = weights(b);
            assertEquals(3, r.layers().size());
            for (PruningReport.Layer l : r.layers()) {
                float[] w0 = before.get(l.path() + ".weight");
                float[] w1 = after.get(l.path() + ".weight");
                assertEquals(Math.round(0.3 * w0.length), l.zeros(), l.path());
                assertEquals(l.zeros(), countZeros(w1));
                float maxPruned = 0;
                float minKept = Float.MAX_VALUE;
                for (int i = 0; i < w0.length; i++) {
                    if (w1[i] == 0) {
                        maxPruned = Math.max(maxPruned, Math.abs(w0[i]));
                    } else {
                        assertEquals(w0[i], w1[i], "kept weights are unchanged");
                        minKept = Math.min(minKept, Math.abs(w0[i]));
                    }
                }
                assertTrue(maxPruned <= minKept, l.path() + ": pruned " + maxPruned + " > kept " + minKept);
            }
        }
    }

    @Test
    void unstructuredGlobalRanksAcrossLayers() {
        try (NDManager m = manager.newSubManager()) {
            SequentialBlock b = QuantizerTest.mlp(m, 22);
            Map<String, float[]> before = weights(b);
            PruningReport r = Pruner.prune(b, PruningConfig.unstructured(0.6).withGlobal(true));
            Map<String, float[]> after = weights(b);
            long total = 0;
            long zeros = 0;
            float maxPruned = 0;
            float minKept = Float.MAX_VALUE;
            List<Double> sparsities = new ArrayList<>();
            for (String k : before.keySet()) {
                float[] w0 = before.get(k);
                float[] w1 = after.get(k);
                total += w0.length;
                zeros += countZeros(w1);
                for (int i = 0; i < w0.length; i++) {
                    if (w1[i] == 0) {
                        maxPruned = Math.max(maxPruned, Math.abs(w0[i]));
                    } else {
                        minKept = Math.min(minKept, Math.abs(w0[i]));
                    }
                }
            }
            r.layers().forEach(l -> sparsities.add(l.sparsity()));
            assertEquals(Math.round(0.6 * total), zeros);
            assertEquals((double) Math.round(0.6 * total) / total, r.overallSparsity(), 1e-12);
            assertTrue(maxPruned <= minKept);
            // layers with larger weights (std 1/sqrt(128) vs 1/sqrt(256)) keep more: sparsities differ per layer
            assertTrue(sparsities.get(0) < sparsities.get(1), sparsities.toString());
        }
    }

    @Test
    void twoFourKeepsTheTwoLargestOfEveryFour() {
        try (NDManager m = manager.newSubManager()) {
            SequentialBlock b = QuantizerTest.mlp(m, 23);
            Map<String, float[]> before = weights(b);
            PruningReport r = Pruner.prune(b, PruningConfig.twoFour());
            Map<String, float[]> after = weights(b);
            for (PruningReport.Layer l : r.layers()) {
                assertEquals(0.5, l.sparsity(), 0.0, l.path());
            }
            for (String k : before.keySet()) {
                float[] w0 = before.get(k);
                float[] w1 = after.get(k);
                for (int g = 0; g < w0.length / 4; g++) {
                    int kept = 0;
                    float minKept = Float.MAX_VALUE;
                    float maxDropped = 0;
                    for (int j = 4 * g; j < 4 * g + 4; j++) {
                        if (w1[j] != 0) {
                            kept++;
                            assertEquals(w0[j], w1[j]);
                            minKept = Math.min(minKept, Math.abs(w0[j]));
                        } else {
                            maxDropped = Math.max(maxDropped, Math.abs(w0[j]));
                        }
                    }
                    assertEquals(2, kept, k + " group " + g);
                    assertTrue(maxDropped <= minKept, k + " group " + g);
                }
            }
        }
    }

    @Test
    void sparse24LayoutIsAsDocumented() {
        try (NDManager m = manager.newSubManager()) {
            // row 0: group 0 keeps positions 1 and 3 (nibble 1 + 4*3 = 13), group 1 keeps 0 and 3 (nibble 12)
            // row 1: group 0 has one non-zero: keeps it and one zero; group 1 keeps 1 and 2 (nibble 1 + 8 = 9)
            NDArray w = m.create(new float[] {0, 5, 0, -3, 2, 0, 0, 7, 0, 0, 4, 0, 0, 1, -2, 0}, new Shape(2, 8));
            Sparse24 s = Sparse24.compress(w);
            assertArrayEquals(new float[] {5, -3, 2, 7}, s.values().get(0).toFloatArray());
            byte[] idx = s.indices().toByteArray();
            assertEquals((byte) (13 + 16 * 12), idx[0]);
            int row1g0 = idx[1] & 0xF;
            assertEquals(9, (idx[1] & 0xFF) >> 4);
            assertTrue(row1g0 == 2 + 4 * 3 || row1g0 == 0 + 4 * 2 || row1g0 == 1 + 4 * 2, "nibble " + row1g0);
            assertArrayEquals(w.toFloatArray(), s.decompress(m).toFloatArray());
        }
    }

    @Test
    void sparse24RoundTripsAPrunedLayerExactlyInFp32AndFp16() {
        for (DataType type : new DataType[] {DataType.FLOAT32, DataType.FLOAT16}) {
            try (NDManager m = manager.newSubManager()) {
                SequentialBlock b = QuantizerTest.mlp(m, 24);
                Pruner.prune(b, PruningConfig.twoFour());
                NDArray w = BlockTrees.parameters(b).get("2.weight").getArray().toType(type, true);
                Sparse24 s = Sparse24.compress(w);
                assertEquals(new Shape(256, 128), s.values().getShape());
                assertEquals(new Shape(256, 32), s.indices().getShape());
                assertEquals(type, s.values().getDataType());
                NDArray back = s.decompress(m);
                assertEquals(type, back.getDataType());
                assertArrayEquals(w.toType(DataType.FLOAT32, false).toFloatArray(),
                        back.toType(DataType.FLOAT32, false).toFloatArray());
            }
        }
    }

    @Test
    void sparse24RejectsDenseAndOddWidths() {
        try (NDManager m = manager.newSubManager()) {
            IllegalArgumentException dense = assertThrows(IllegalArgumentException.class,
                    () -> Sparse24.compress(m.ones(new Shape(2, 8))));
            assertTrue(dense.getMessage().contains("not 2:4 sparse"), dense.getMessage());
            IllegalArgumentException odd = assertThrows(IllegalArgumentException.class,
                    () -> Sparse24.compress(m.zeros(new Shape(2, 12))));
            assertTrue(odd.getMessage().contains("in % 8 == 0"), odd.getMessage());
            assertThrows(IllegalArgumentException.class, () -> PruningConfig.unstructured(1.0));
            assertThrows(IllegalArgumentException.class, () -> PruningConfig.parse("3:4"));
            assertEquals(PruningConfig.Pattern.SEMI_STRUCTURED_2_4, PruningConfig.parse("2:4").pattern());
            assertEquals(0.25, PruningConfig.parse("0.25").sparsity());
        }
    }

    @Test
    void pruneThenQuantizeKeepsThePattern() {
        try (NDManager m = manager.newSubManager()) {
            SequentialBlock b = QuantizerTest.mlp(m, 25);
            Pruner.prune(b, PruningConfig.twoFour());
            float[] pruned = BlockTrees.parameters(b).get("2.weight").getArray().toFloatArray();
            Quantizer.quantize(b, Int4WeightOnlyConfig.builder().optGroupSize(32).build());
            float[] deq = ((QuantizedLinear) BlockTrees.get(b, "2")).weight(m).toFloatArray();
            for (int i = 0; i < pruned.length; i++) {
                if (pruned[i] == 0) {
                    assertEquals(0f, deq[i], "element " + i);
                }
            }
        }
    }

    private static long countZeros(float[] a) {
        long n = 0;
        for (float v : a) {
            if (v == 0) {
                n++;
            }
        }
        return n;
    }
}
