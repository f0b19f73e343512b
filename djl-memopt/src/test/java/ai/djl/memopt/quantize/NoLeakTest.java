package ai.djl.memopt.quantize;

import static org.junit.jupiter.api.Assertions.assertEquals;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.SequentialBlock;
import java.util.function.Supplier;
import org.junit.jupiter.api.Test;

/**
 * DJL attaches every op result to its first operand's manager: these check that no quantization or pruning routine
 * leaves temporaries in the manager of the arrays it was given (only what it returns is added).
 */
class NoLeakTest {

    private static void check(NDManager m, int returned, Supplier<AutoCloseable> op) throws Exception {
        int before = m.getManagedArrays().size();
        AutoCloseable result = op.get();
        if (result instanceof QuantizedTensor) {
            QuantizedTensor t = (QuantizedTensor) result;
            returned = 2 + (t.zeros().isPresent() ? 1 : 0) + (t.inputScales().isPresent() ? 1 : 0);
        }
        assertEquals(before + returned, m.getManagedArrays().size(), "arrays left in the caller's manager");
        if (result != null) {
            result.close();
            assertEquals(before, m.getManagedArrays().size());
        }
    }

    @Test
    void routinesLeaveOnlyTheirResults() throws Exception {
        try (NDManager m = NDManager.newBaseManager()) {
            NDArray w = m.randomNormal(new Shape(32, 64));
            NDArray x = m.randomNormal(new Shape(40, 64));
            NDArray mean = x.abs().mean(new int[] {0});
            NDArray xtx = x.transpose().matMul(x);
            check(m, 2, () -> QuantizedTensor.quantize(w, QuantScheme.INT8_WEIGHT_ONLY, 64));
            check(m, 3, () -> QuantizedTensor.quantize(w, QuantScheme.INT4_WEIGHT_ONLY, 32));
            check(m, 4, () -> QuantizedTensor.quantize(w, QuantScheme.INT4_WEIGHT_ONLY, 32, mean));
            QuantizedTensor q = QuantizedTensor.quantize(w, QuantScheme.INT4_WEIGHT_ONLY, 64, mean);
            check(m, 1, () -> q.dequantize(m, DataType.FLOAT16));
            check(m, 0, () -> {
                Quantizer.sqnrDb(w, q);
                return null;
            });
            check(m, 4, () -> AwqSearch.search(w, x, mean, QuantScheme.INT4_WEIGHT_ONLY, 32, 4).tensor);
            check(m, 3, () -> GptqSolver.quantize(w, xtx, 40, QuantScheme.INT4_WEIGHT_ONLY, 32));
            check(m, 2, () -> GptqSolver.quantize(w, xtx, 40, QuantScheme.INT8_WEIGHT_ONLY, 64));
            NDArray threes = m.zeros(new Shape(4, 8)).add(3f);
            check(m, 1, () -> Int4Packing.pack(threes));
            NDArray packed = Int4Packing.pack(m.ones(new Shape(4, 8)));
            check(m, 1, () -> Int4Packing.unpack(packed));
            SequentialBlock b = QuantizerTest.mlp(m, 2);
            check(m, 0, () -> {
                Pruner.prune(b, PruningConfig.twoFour());
                Pruner.prune(b, PruningConfig.unstructured(0.7).withGlobal(true));
                Pruner.prune(b, PruningConfig.unstructured(0.8));
                return null;
            });
            NDArray pruned = b.getChildren().get(0).getValue().getParameters().get("weight").getArray();
            NDArray sparse = Pruner.topTwoOfFour(pruned.abs().reshape(256, 32, 4)).reshape(256, 128)
                    .toType(DataType.FLOAT32, false).mul(pruned);
            Sparse24[] holder = new Sparse24[1];
            check(m, 2, () -> {
                holder[0] = Sparse24.compress(sparse);
                return null;
            });
            check(m, 1, () -> holder[0].decompress(m));
        }
    }

    private static void check0(NDManager m, int returned, Supplier<AutoCloseable> op) {
        try {
            check(m, returned, op);
        } catch (Exception e) {
            throw new AssertionError(e);
        }
    }
}
