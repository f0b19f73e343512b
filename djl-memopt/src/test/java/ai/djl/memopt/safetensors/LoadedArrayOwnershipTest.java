package ai.djl.memopt.safetensors;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;

import ai.djl.Device;
import ai.djl.memopt.testing.JavaBuffers;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Path;
import java.util.Map;
import java.util.function.UnaryOperator;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * The arrays {@link SafetensorsFile} loads own their memory: libtorch allocated it, so every other handle on it (DJL
 * 0.36's no-op "copies", views) stays valid after the loaded array is closed or collected. Without that, a no-op
 * {@code toType(sameType, true)} kept past the loaded array read memory that the garbage collector had freed (issue
 * 13's resume crash). The Java buffer behind an array, if any, is overwritten here as malloc's next user would: an
 * alias that reads the pattern shares that buffer.
 */
class LoadedArrayOwnershipTest {

    @TempDir Path tmp;

    /** Handles on the same storage that DJL 0.36 hands out where a caller may expect a copy. */
    private static final Map<String, UnaryOperator<NDArray>> ALIASES = Map.of(
            "toType(same, copy=true)", a -> a.toType(a.getDataType(), true),
            "toDevice(cpu, copy=true)", a -> a.toDevice(Device.cpu(), true),
            "reshape", a -> a.reshape(-1),
            "slice", a -> a.get("1:"),
            "stopGradient", NDArray::stopGradient);

    @Test
    void everyTypeLoadsIntoMemoryOfItsOwn() throws IOException {
        Map<String, float[]> expected = TensorZoo.write(tmp.resolve("zoo.safetensors"), 1, 16, 4096);
        try (SafetensorsFile f = SafetensorsFile.open(tmp.resolve("zoo.safetensors"));
                NDManager m = NDManager.newBaseManager(Device.cpu())) {
            for (Map.Entry<String, float[]> e : expected.entrySet()) {
                String name = e.getKey();
                NDArray a = f.load(m, name);
                assertNull(JavaBuffers.of(a), name + " is an array over a Java buffer");
                for (Map.Entry<String, UnaryOperator<NDArray>> alias : ALIASES.entrySet()) {
                    NDArray view = alias.getValue().apply(a);
                    JavaBuffers.scribble(a);
                    assertArrayEquals(tail(e.getValue(), alias.getKey()), floats(view),
                            name + " through " + alias.getKey() + " reads memory it does not own");
                }
            }
        }
    }

    @Test
    void conversionsOnLoadGiveArraysOfTheirOwnToo() throws IOException {
        Map<String, float[]> expected = TensorZoo.write(tmp.resolve("zoo.safetensors"), 2, 64);
        try (HfCheckpoint ckpt = writeAsCheckpoint(); NDManager m = NDManager.newBaseManager(Device.cpu())) {
            for (String name : new String[] {"f32_64", "f16_64", "bf16_64", "f64_64"}) {
                for (DataType target : new DataType[] {DataType.FLOAT32, DataType.FLOAT16}) {
                    NDArray a = ckpt.load(m, name, target);
                    assertEquals(target, a.getDataType());
                    assertNull(JavaBuffers.of(a), name + " as " + target + " is an array over a Java buffer");
                    NDArray alias = a.toType(target, true);
                    JavaBuffers.scribble(a);
                    assertArrayEquals(expected.get(name), floats(alias), name + " as " + target);
                }
            }
        }
    }

    private HfCheckpoint writeAsCheckpoint() throws IOException {
        java.nio.file.Files.move(tmp.resolve("zoo.safetensors"), tmp.resolve(HfCheckpoint.SINGLE_FILE));
        return HfCheckpoint.open(tmp);
    }

    /** The values the alias shows: all of them, or from the second row on for a slice. */
    private static float[] tail(float[] values, String alias) {
        return alias.equals("slice") ? java.util.Arrays.copyOfRange(values, 4, values.length) : values;
    }

    static float[] floats(NDArray a) {
        try (NDArray f = a.toType(DataType.FLOAT32, true)) {
            return f.toFloatArray();
        }
    }
}
