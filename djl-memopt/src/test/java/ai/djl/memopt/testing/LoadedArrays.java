package ai.djl.memopt.testing;

import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * Checks that what a loader returns is libtorch's own memory (issue 13): every array of a loaded model keeps its values
 * through a handle taken on the same storage (a no-op {@code toType(sameType, copy=true)}, which DJL 0.36 does not
 * copy) after the model's manager is closed, the garbage collector has run and freed native memory has been handed
 * out and overwritten again. An array made over a Java direct buffer ({@code manager.create(buffer ...)},
 * {@code create(float[])}, {@code set(ByteBuffer)}) fails both ways: {@link JavaBuffers#of} finds its buffer, and the
 * handle then reads the overwritten memory (or crashes the JVM, which a caller can avoid with {@link ForkedJvm}).
 *
 * <pre>{@code
 * NDManager loadManager = manager.newSubManager();
 * DeepSeekForCausalLM lm = SomeLoader.load(path, loadManager, DataType.FLOAT32);
 * LoadedArrays.assertOwned(LoadedArrays.of(lm), loadManager);
 * }</pre>
 */
public final class LoadedArrays {

    private LoadedArrays() {}

    /** Every array of {@code root}: initialized parameters, and the codes, scales and zeros of quantized layers. */
    public static Map<String, NDArray> of(Block root) {
        Map<String, NDArray> out = new TreeMap<>();
        for (Map.Entry<String, Parameter> p : BlockTrees.parameters(root).entrySet()) {
            if (p.getValue().isInitialized()) {
                out.put(p.getKey(), p.getValue().getArray());
            }
        }
        for (Map.Entry<String, Block> b : BlockTrees.walk(root).entrySet()) {
            QuantizedTensor q = b.getValue() instanceof QuantizedLinear ql ? ql.quantizedWeight()
                    : b.getValue() instanceof QuantizedEmbedding qe ? qe.quantizedTable() : null;
            if (q != null) {
                out.put(b.getKey() + "#data", q.data());
                out.put(b.getKey() + "#scales", q.scales());
                q.zeros().ifPresent(z -> out.put(b.getKey() + "#zeros", z));
            }
        }
        return out;
    }

    /**
     * Fails, naming the arrays, unless every one of {@code arrays} (CPU arrays that closing {@code owner} closes) uses
     * memory that libtorch allocated, and a handle on its storage taken now reads the same values after {@code owner}
     * is closed, garbage is collected and freed native memory is refilled.
     */
    public static void assertOwned(Map<String, NDArray> arrays, AutoCloseable owner) throws Exception {
        assertTrue(!arrays.isEmpty(), "no arrays to check");
        List<String> overJavaBuffers = new ArrayList<>();
        List<String> changed = new ArrayList<>();
        try (NDManager keeper = NDManager.newBaseManager(Device.cpu())) {
            Map<String, NDArray> handles = new LinkedHashMap<>();
            Map<String, float[]> expected = new LinkedHashMap<>();
            for (Map.Entry<String, NDArray> e : arrays.entrySet()) {
                NDArray a = e.getValue();
                if (JavaBuffers.of(a) != null) {
                    overJavaBuffers.add(e.getKey());
                }
                NDArray handle = a.toType(a.getDataType(), true); // the same storage in DJL 0.36
                handle.attach(keeper);
                handles.put(e.getKey(), handle);
                expected.put(e.getKey(), floats(a));
            }
            owner.close(); // the arrays go, and with them DJL's references to any Java buffers behind them
            JavaBuffers.overwriteFreedMemory();
            for (Map.Entry<String, NDArray> h : handles.entrySet()) {
                if (!Arrays.equals(expected.get(h.getKey()), floats(h.getValue()))) {
                    changed.add(h.getKey());
                }
            }
        }
        assertTrue(overJavaBuffers.isEmpty() && changed.isEmpty(), overJavaBuffers.size() + " of " + arrays.size()
                + " arrays use a Java buffer's memory " + head(overJavaBuffers) + "; " + changed.size()
                + " changed once their loader's buffers were collected " + head(changed));
    }

    private static String head(List<String> names) {
        return names.size() <= 5 ? names.toString() : names.subList(0, 5) + "...";
    }

    private static float[] floats(NDArray a) {
        try (NDArray f = a.toType(DataType.FLOAT32, true)) {
            return f.toFloatArray();
        }
    }
}
