package ai.djl.memopt.quantize;

import ai.djl.memopt.nn.Scalars;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;

/**
 * Packs 4-bit values two per byte into UINT8 arrays (DJL has no int4 type) and unpacks them on the device.
 *
 * <p><b>Packing order</b> (the artifact format depends on it): the unpacked array of shape {@code (..., n)}, n even,
 * is read in row-major order; element {@code 2i} goes to the low nibble and element {@code 2i+1} to the high nibble
 * of byte {@code i}: {@code byte[i] = v[2i] + 16 * v[2i+1]}. For a weight {@code (out, in)} this gives a packed
 * {@code (out, in/2)} array, and pairs never straddle two rows. This is the same order as GPTQ/AWQ "little nibble
 * first" packing within a byte.
 *
 * <p>DJL has no bitwise operators, so both directions use exact integer arithmetic in FP32 (every value involved is
 * an integer below 256, exactly representable): {@code high = floor(b / 16)}, {@code low = b - 16 * high}. Unpacking
 * runs at every forward of a quantized layer, so it is NDArray ops on the array's device, never a Java loop.
 */
public final class Int4Packing {

    private Int4Packing() {}

    /**
     * Packs integer values in {@code [0, 15]} (any numeric type) of shape {@code (..., n)} into UINT8
     * {@code (..., n/2)}.
     *
     * @throws IllegalArgumentException if the last dimension is odd or zero, or a value is not an integer in [0, 15]
     */
    public static NDArray pack(NDArray values) {
        Shape shape = values.getShape();
        Preconditions.checkArgument(shape.dimension() >= 1, "cannot pack a scalar into nibbles");
        long n = shape.get(shape.dimension() - 1);
        Preconditions.checkArgument(n > 0 && n % 2 == 0,
                "int4 packing needs an even, non-zero last dimension (two values per byte), got shape %s", shape);
        try (NDManager tmp = values.getManager().newSubManager(values.getDevice())) {
            NDArray f = Temps.copy(values, tmp, DataType.FLOAT32);
            float min = f.min().getFloat();
            float max = f.max().getFloat();
            boolean integral = f.sub(f.round()).abs().max().getFloat() == 0f;
            Preconditions.checkArgument(min >= 0 && max <= 15 && integral,
                    "int4 packing needs integers in [0, 15], got values in [%s, %s]%s", min, max,
                    integral ? "" : " with fractions");
            Shape pairs = shape.slice(0, shape.dimension() - 1).add(n / 2, 2);
            NDArray p = f.reshape(pairs); // (..., n/2, 2)
            NDArray low = p.get(new NDIndex("..., 0"));
            NDArray high = p.get(new NDIndex("..., 1"));
            NDArray packed = low.add(high.mul(16f)).toType(DataType.UINT8, false); // (..., n/2)
            packed.attach(values.getManager());
            return packed;
        }
    }

    /**
     * Unpacks UINT8 {@code (..., m)} into FP32 {@code (..., 2m)} values in [0, 15], attached to the packed array's
     * manager (callers scope it).
     */
    public static NDArray unpack(NDArray packed) {
        Preconditions.checkArgument(packed.getDataType() == DataType.UINT8,
                "packed int4 data must be UINT8, got %s", packed.getDataType());
        Shape shape = packed.getShape();
        Preconditions.checkArgument(shape.dimension() >= 1, "cannot unpack a scalar");
        Shape out = shape.slice(0, shape.dimension() - 1).add(shape.get(shape.dimension() - 1) * 2);
        // The constants are device-made scalars (Scalars), not Java numbers: those would be uploaded from the host at
        // every call, a blocking copy on a GPU, and this runs for every int4 layer at every step. x * 1/16 equals
        // x / 16 exactly (a power of two).
        try (NDArray b = packed.toType(DataType.FLOAT32, false);
                NDArray b16 = Scalars.mul(b, 1.0 / 16);
                NDArray high = b16.floor();
                NDArray high16 = Scalars.mul(high, 16);
                NDArray low = b.sub(high16);
                NDArray pairs = NDArrays.stack(new NDList(low, high), -1)) { // (..., m, 2)
            return pairs.reshape(out); // (..., 2m)
        }
    }
}
