package ai.djl.memopt.gguf;

import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.memopt.safetensors.Halfs;
import ai.djl.memopt.safetensors.OwnedArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.Optional;

/**
 * ggml's Q8_0 and Q4_0 blocks as our quantized tensors and back, without going through float: the integers are
 * moved, the FP16 block scales widened to FP32 exactly.
 *
 * <ul>
 *   <li>Q8_0 block {@code (d, qs[32])}, {@code x = qs[j] * d}: int8 with group size 32, {@code scales = d}.</li>
 *   <li>Q4_0 block {@code (d, qs[16])}, {@code x = (q - 8) * d}: int4 with group size 32, zero point 8,
 *       {@code scales = d}; only the nibble order differs (ggml: value j low and j+16 high in byte j; ours: values
 *       2k low and 2k+1 high in byte k), so the nibbles are re-paired.</li>
 * </ul>
 *
 * <p>Our int4 dequantizes {@code (q - z) * s} and int8 {@code q * s} in FP32 with the same operands as ggml's
 * {@code dequantize_row_*}, so a loaded layer's weights equal ggml's bit for bit. The way back ({@link #toGgml}) is
 * exact only for tensors of that form (group 32, zero points 8, FP16-representable scales, no AWQ input scales);
 * anything else is re-quantized from float by the caller.
 */
public final class GgufBlocks {

    private static final int QK = GgmlQuants.QK;

    private GgufBlocks() {}

    /**
     * Wraps {@code rows} rows of {@code in} values of Q8_0 or Q4_0 blocks as a quantized {@code (rows, in)} tensor on
     * {@code manager}.
     */
    public static QuantizedTensor toQuantized(GgmlType type, ByteBuffer blocks, long rows, long in,
            NDManager manager) {
        int n = Math.toIntExact(rows * in);
        int groups = Math.toIntExact(rows * in / QK);
        float[] scales = new float[groups];
        ByteBuffer b = blocks.order(ByteOrder.LITTLE_ENDIAN);
        Shape shape = new Shape(rows, in);
        if (type == GgmlType.Q8_0) {
            byte[] q = new byte[n];
            for (int g = 0; g < groups; g++) {
                scales[g] = Halfs.f16ToFloat(b.getShort());
                b.get(q, g * QK, QK);
            }
            NDArray data = OwnedArrays.copyOf(manager, ByteBuffer.wrap(q), new Shape(rows, in), DataType.INT8);
            NDArray s = OwnedArrays.of(manager, scales, new Shape(rows, in / QK));
            return QuantizedTensor.of(QuantScheme.INT8_WEIGHT_ONLY, QK, shape, data, s, null, null);
        }
        if (type == GgmlType.Q4_0) {
            byte[] packed = new byte[n / 2];
            byte[] zeros = new byte[groups];
            byte[] qs = new byte[QK / 2];
            for (int g = 0; g < groups; g++) {
                scales[g] = Halfs.f16ToFloat(b.getShort());
                zeros[g] = 8;
                b.get(qs);
                int base = g * QK / 2;
                for (int k = 0; k < QK / 2; k++) {
                    // values 2k and 2k+1 of the block: ggml keeps value j < 16 in the low nibble of qs[j], value
                    // j >= 16 in the high nibble of qs[j - 16]
                    packed[base + k] = (byte) (nibble(qs, 2 * k) | (nibble(qs, 2 * k + 1) << 4));
                }
            }
            NDArray data = OwnedArrays.copyOf(manager, ByteBuffer.wrap(packed), new Shape(rows, in / 2), DataType.UINT8);
            NDArray s = OwnedArrays.of(manager, scales, new Shape(rows, in / QK));
            NDArray z = OwnedArrays.copyOf(manager, ByteBuffer.wrap(zeros), new Shape(rows, in / QK), DataType.UINT8);
            return QuantizedTensor.of(QuantScheme.INT4_WEIGHT_ONLY, QK, shape, data, s, z, null);
        }
        throw new IllegalArgumentException(type + " has no quantized layout of ours");
    }

    private static int nibble(byte[] qs, int j) {
        return j < QK / 2 ? qs[j] & 0x0f : (qs[j - QK / 2] >>> 4) & 0x0f;
    }

    /**
     * The ggml blocks of a quantized tensor when it is exactly of Q8_0's or Q4_0's form (see the class comment),
     * else empty.
     */
    public static Optional<byte[]> toGgml(QuantizedTensor t, GgmlType type) {
        if (t.groupSize() != QK || t.inputScales().isPresent()) {
            return Optional.empty();
        }
        float[] scales = t.scales().toFloatArray();
        short[] halves = new short[scales.length];
        for (int i = 0; i < scales.length; i++) {
            halves[i] = Halfs.floatToF16(scales[i]);
            if (Halfs.f16ToFloat(halves[i]) != scales[i]) {
                return Optional.empty();
            }
        }
        byte[] data = t.data().toByteArray();
        ByteBuffer out;
        if (type == GgmlType.Q8_0 && t.scheme() == QuantScheme.INT8_WEIGHT_ONLY) {
            out = ByteBuffer.allocate(scales.length * type.blockBytes()).order(ByteOrder.LITTLE_ENDIAN);
            for (int g = 0; g < scales.length; g++) {
                out.putShort(halves[g]);
                out.put(data, g * QK, QK);
            }
            return Optional.of(out.array());
        }
        if (type == GgmlType.Q4_0 && t.scheme() == QuantScheme.INT4_WEIGHT_ONLY) {
            byte[] zeros = t.zeros().orElseThrow().toByteArray();
            for (byte z : zeros) {
                if (z != 8) {
                    return Optional.empty();
                }
            }
            out = ByteBuffer.allocate(scales.length * type.blockBytes()).order(ByteOrder.LITTLE_ENDIAN);
            int[] v = new int[QK];
            for (int g = 0; g < scales.length; g++) {
                for (int k = 0; k < QK / 2; k++) {
                    int b = data[g * QK / 2 + k] & 0xff;
                    v[2 * k] = b & 0x0f;
                    v[2 * k + 1] = b >>> 4;
                }
                out.putShort(halves[g]);
                for (int j = 0; j < QK / 2; j++) {
                    out.put((byte) (v[j] | (v[j + QK / 2] << 4)));
                }
            }
            return Optional.of(out.array());
        }
        return Optional.empty();
    }
}
