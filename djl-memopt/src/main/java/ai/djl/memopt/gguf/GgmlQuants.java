package ai.djl.memopt.gguf;

import ai.djl.memopt.safetensors.Halfs;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;

/**
 * ggml's reference quantizers and dequantizers for Q8_0 and Q4_0, bit for bit ({@code quantize_row_q8_0_ref},
 * {@code quantize_row_q4_0_ref}, {@code dequantize_row_q*_0} in {@code ggml-quants.c}): the same single-precision
 * arithmetic in the same order, {@code roundf} (half away from zero) and the float-to-half conversion rounding to
 * nearest even. llama.cpp's {@code llama-quantize} without an importance matrix writes exactly these bytes.
 *
 * <pre>{@code
 * byte[] blocks = GgmlQuants.quantize(GgmlType.Q4_0, row);   // row.length / 32 * 18 bytes
 * float[] back = GgmlQuants.dequantize(GgmlType.Q4_0, ByteBuffer.wrap(blocks), row.length);
 * }</pre>
 */
public final class GgmlQuants {

    static final int QK = 32;

    private GgmlQuants() {}

    /** Encodes {@code x} (a multiple of the block size long) into {@code type}'s bytes (F32, F16, Q8_0 or Q4_0). */
    public static byte[] quantize(GgmlType type, float[] x) {
        byte[] out = new byte[Math.toIntExact(type.rowBytes(x.length))];
        quantize(type, x, 0, x.length, ByteBuffer.wrap(out).order(ByteOrder.LITTLE_ENDIAN));
        return out;
    }

    /** Encodes {@code n} values of {@code x} from {@code from} into {@code out} (little-endian, advanced). */
    public static void quantize(GgmlType type, float[] x, int from, int n, ByteBuffer out) {
        switch (type) {
            case F32:
                for (int i = 0; i < n; i++) {
                    out.putFloat(x[from + i]);
                }
                break;
            case F16:
                for (int i = 0; i < n; i++) {
                    out.putShort(Halfs.floatToF16(x[from + i]));
                }
                break;
            case Q8_0:
                type.rowBytes(n);
                for (int b = from; b < from + n; b += QK) {
                    q8Block(x, b, out);
                }
                break;
            case Q4_0:
                type.rowBytes(n);
                for (int b = from; b < from + n; b += QK) {
                    q4Block(x, b, out);
                }
                break;
            default:
                throw new IllegalArgumentException("cannot write " + type);
        }
    }

    private static void q8Block(float[] x, int at, ByteBuffer out) {
        float amax = 0f;
        for (int j = 0; j < QK; j++) {
            amax = Math.max(amax, Math.abs(x[at + j]));
        }
        float d = amax / 127;
        float id = d != 0f ? 1.0f / d : 0.0f;
        out.putShort(Halfs.floatToF16(d));
        for (int j = 0; j < QK; j++) {
            out.put((byte) roundf(x[at + j] * id));
        }
    }

    private static void q4Block(float[] x, int at, ByteBuffer out) {
        float amax = 0f;
        float max = 0f;
        for (int j = 0; j < QK; j++) {
            float v = x[at + j];
            if (amax < Math.abs(v)) {
                amax = Math.abs(v);
                max = v;
            }
        }
        float d = max / -8;
        float id = d != 0f ? 1.0f / d : 0.0f;
        out.putShort(Halfs.floatToF16(d));
        for (int j = 0; j < QK / 2; j++) {
            float x0 = x[at + j] * id;
            float x1 = x[at + QK / 2 + j] * id;
            int xi0 = Math.min(15, (byte) (int) (x0 + 8.5f));
            int xi1 = Math.min(15, (byte) (int) (x1 + 8.5f));
            out.put((byte) (xi0 | (xi1 << 4)));
        }
    }

    /** C's {@code roundf}: halves away from zero. */
    static int roundf(float v) {
        return v < 0 ? -Math.round(-v) : Math.round(v);
    }

    /** Decodes {@code n} values of {@code type} from {@code in} (little-endian, advanced) into float. */
    public static float[] dequantize(GgmlType type, ByteBuffer in, int n) {
        float[] y = new float[n];
        dequantize(type, in, y, 0, n);
        return y;
    }

    /** Decodes {@code n} values into {@code y} from {@code at}. */
    public static void dequantize(GgmlType type, ByteBuffer in, float[] y, int at, int n) {
        ByteBuffer b = in.order(ByteOrder.LITTLE_ENDIAN);
        switch (type) {
            case F32:
                for (int i = 0; i < n; i++) {
                    y[at + i] = b.getFloat();
                }
                break;
            case F16:
                for (int i = 0; i < n; i++) {
                    y[at + i] = Halfs.f16ToFloat(b.getShort());
                }
                break;
            case BF16:
                for (int i = 0; i < n; i++) {
                    y[at + i] = Halfs.bf16ToFloat(b.getShort());
                }
                break;
            case Q8_0:
                type.rowBytes(n);
                for (int k = at; k < at + n; k += QK) {
                    float d = Halfs.f16ToFloat(b.getShort());
                    for (int j = 0; j < QK; j++) {
                        y[k + j] = b.get() * d;
                    }
                }
                break;
            case Q4_0:
                type.rowBytes(n);
                for (int k = at; k < at + n; k += QK) {
                    float d = Halfs.f16ToFloat(b.getShort());
                    for (int j = 0; j < QK / 2; j++) {
                        int q = b.get() & 0xff;
                        y[k + j] = ((q & 0x0f) - 8) * d;
                        y[k + j + QK / 2] = ((q >>> 4) - 8) * d;
                    }
                }
                break;
            default:
                throw new IllegalArgumentException("cannot read " + type);
        }
    }
}
