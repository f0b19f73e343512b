package ai.djl.memopt.safetensors;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.SplittableRandom;

/**
 * A safetensors file with one tensor of every type the format has, written byte by byte here, and the values each
 * element holds (as float; integers are small), computed independently of the reader.
 */
final class TensorZoo {

    private TensorZoo() {}

    /** Name to expected values; tensors are named {@code <type>_<numel>} and shaped {@code (numel / 4, 4)}. */
    static Map<String, float[]> write(Path file, long seed, int... sizes) throws IOException {
        SafetensorsWriter writer = new SafetensorsWriter();
        Map<String, float[]> expected = new LinkedHashMap<>();
        SplittableRandom random = new SplittableRandom(seed);
        for (int n : sizes) {
            if (n % 4 != 0) {
                throw new IllegalArgumentException("sizes are multiples of 4: " + n);
            }
            for (SafetensorsDType type : SafetensorsDType.values()) {
                float[] values = new float[n];
                ByteBuffer data = ByteBuffer.allocate(n * type.byteSize()).order(ByteOrder.LITTLE_ENDIAN);
                for (int i = 0; i < n; i++) {
                    // floats exact in F16 and BF16 (8 bits of mantissa at most), integers that fit in I8
                    int k = random.nextInt(-100, 100);
                    float v = type.isFloating() ? k / 32f : type == SafetensorsDType.U8 ? k + 100
                            : type == SafetensorsDType.BOOL ? k & 1 : k;
                    values[i] = v;
                    put(data, type, v);
                }
                data.flip();
                String name = type.name().toLowerCase(java.util.Locale.ROOT) + "_" + n;
                writer.add(name, type, new long[] {n / 4, 4}, data);
                expected.put(name, values);
            }
        }
        writer.write(file);
        return expected;
    }

    private static void put(ByteBuffer b, SafetensorsDType type, float v) {
        switch (type) {
            case F64:
                b.putDouble(v);
                break;
            case F32:
                b.putFloat(v);
                break;
            case F16:
                b.putShort(Halfs.floatToF16(v));
                break;
            case BF16:
                b.putShort(Halfs.floatToBf16(v));
                break;
            case I64:
                b.putLong((long) v);
                break;
            case I32:
                b.putInt((int) v);
                break;
            case I16:
                b.putShort((short) v);
                break;
            case I8:
            case U8:
            case BOOL:
                b.put((byte) v);
                break;
            default:
                throw new AssertionError(type);
        }
    }
}
