package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;

/**
 * Compact storage of a 2:4 semi-structured sparse weight {@code (out, in)}: the two kept values of every group of 4
 * consecutive input weights, and their 2-bit positions.
 *
 * <p><b>Layout.</b> Group {@code j} of a row covers columns {@code 4j .. 4j+3}; its kept positions {@code p0 < p1}
 * (each 0..3) are the two largest magnitudes (a group with fewer than two non-zeros stores zeros).
 * <ul>
 *   <li>{@code values}: the weight's type, {@code (out, in/2)}: {@code values[r, 2j] = w[r, 4j + p0]},
 *       {@code values[r, 2j+1] = w[r, 4j + p1]};
 *   <li>{@code indices}: UINT8 {@code (out, in/8)}: the nibble of group {@code j} is {@code p0 + 4 p1} (bits 0-1 =
 *       p0, bits 2-3 = p1), and nibbles are packed two per byte in {@link Int4Packing} order (group {@code 2k} in the
 *       low nibble of byte {@code k}, group {@code 2k+1} in the high nibble).
 * </ul>
 * So a 2:4 weight takes {@code in/2} values plus {@code in/8} bytes per row instead of {@code in} values (56% of FP32,
 * 62.5% of FP16). Requires {@code in % 8 == 0}.
 */
public final class Sparse24 {

    private final NDArray values;
    private final NDArray indices;
    private final Shape shape;

    private Sparse24(NDArray values, NDArray indices, Shape shape) {
        this.values = values;
        this.indices = indices;
        this.shape = shape;
    }

    /**
     * Compresses a 2:4 sparse weight; the arrays are attached to the weight's manager.
     *
     * @throws IllegalArgumentException if {@code in % 8 != 0} or some group of 4 has more than 2 non-zeros
     */
    public static Sparse24 compress(NDArray weight) {
        Shape shape = weight.getShape();
        Preconditions.checkArgument(shape.dimension() == 2, "2:4 weights are (out, in), got %s", shape);
        long out = shape.get(0);
        long in = shape.get(1);
        Preconditions.checkArgument(in % 8 == 0, "2:4 compact storage needs in % 8 == 0, got in=%s", in);
        NDManager target = weight.getManager();
        try (NDManager tmp = target.newSubManager(weight.getDevice())) {
            NDArray w = Temps.copy(weight, tmp, DataType.FLOAT32).reshape(out, in / 4, 4); // (out, G, 4)
            NDArray keep = Pruner.topTwoOfFour(w.abs()); // (out, G, 4) boolean, exactly 2 per group
            NDArray dropped = w.mul(keep.logicalNot().toType(DataType.FLOAT32, false)).abs().max();
            Preconditions.checkArgument(dropped.getFloat() == 0f,
                    "weight is not 2:4 sparse: a group of 4 has more than 2 non-zeros (largest extra |w| = %s)",
                    dropped.getFloat());
            NDArray pos = tmp.arange(0f, 4f).reshape(1, 1, 4); // (1, 1, 4)
            NDArray keepF = keep.toType(DataType.FLOAT32, false);
            NDArray p0 = pos.mul(keepF).add(keepF.logicalNot().toType(DataType.FLOAT32, false).mul(4f))
                    .min(new int[] {2}, true); // (out, G, 1)
            NDArray p1 = pos.mul(keepF).sub(keepF.logicalNot().toType(DataType.FLOAT32, false))
                    .max(new int[] {2}, true); // (out, G, 1)
            NDArray v0 = w.mul(pos.eq(p0).toType(DataType.FLOAT32, false)).sum(new int[] {2}); // (out, G)
            NDArray v1 = w.mul(pos.eq(p1).toType(DataType.FLOAT32, false)).sum(new int[] {2}); // (out, G)
            NDArray vals = NDArrays.stack(new NDList(v0, v1), -1).reshape(out, in / 2) // (out, in/2)
                    .toType(weight.getDataType(), false);
            NDArray nibbles = p0.add(p1.mul(4f)).reshape(out, in / 4); // (out, G)
            NDArray idx = Int4Packing.pack(nibbles); // (out, in/8)
            idx.attach(tmp);
            vals.attach(target);
            idx.attach(target);
            return new Sparse24(vals, idx, shape);
        }
    }

    /**
     * Wraps stored arrays after checking them.
     *
     * @throws IllegalArgumentException naming the array with the wrong type or shape
     */
    public static Sparse24 of(NDArray values, NDArray indices, Shape shape) {
        Preconditions.checkArgument(shape.dimension() == 2 && shape.get(1) % 8 == 0,
                "2:4 shape must be (out, in) with in % 8 == 0, got %s", shape);
        Shape vs = new Shape(shape.get(0), shape.get(1) / 2);
        Shape is = new Shape(shape.get(0), shape.get(1) / 8);
        Preconditions.checkArgument(values.getShape().equals(vs), "sparse24_values must have shape %s, got %s", vs,
                values.getShape());
        Preconditions.checkArgument(values.getDataType().isFloating(), "sparse24_values must be floating, got %s",
                values.getDataType());
        Preconditions.checkArgument(indices.getShape().equals(is) && indices.getDataType() == DataType.UINT8,
                "sparse24_indices must be UINT8 %s, got %s %s", is, indices.getDataType(), indices.getShape());
        return new Sparse24(values, indices, shape);
    }

    /** The dense weight {@code (out, in)} in the values' type, attached to {@code manager}. */
    public NDArray decompress(NDManager manager) {
        long out = shape.get(0);
        long in = shape.get(1);
        try (NDManager tmp = manager.newSubManager(values.getDevice())) {
            NDArray unpacked = Int4Packing.unpack(indices); // (out, G) in the indices' manager
            unpacked.attach(tmp);
            NDArray nib = unpacked.reshape(out, in / 4, 1); // (out, G, 1)
            NDArray p1 = nib.div(4f).floor(); // (out, G, 1)
            NDArray p0 = nib.sub(p1.mul(4f)); // (out, G, 1)
            NDArray v = Temps.copy(values, tmp, DataType.FLOAT32).reshape(out, in / 4, 2); // (out, G, 2)
            NDArray pos = tmp.arange(0f, 4f).reshape(1, 1, 4); // (1, 1, 4)
            NDArray dense = v.get(":, :, 0:1").mul(pos.eq(p0).toType(DataType.FLOAT32, false))
                    .add(v.get(":, :, 1:2").mul(pos.eq(p1).toType(DataType.FLOAT32, false))) // (out, G, 4)
                    .add(0f) // negative value * 0 = -0.0; pruned weights are +0.0
                    .reshape(out, in)
                    .toType(values.getDataType(), false);
            dense.attach(manager);
            return dense;
        }
    }

    /** Kept values {@code (out, in/2)}. */
    public NDArray values() {
        return values;
    }

    /** Packed positions UINT8 {@code (out, in/8)}. */
    public NDArray indices() {
        return indices;
    }

    /** The dense shape. */
    public Shape shape() {
        return shape;
    }
}
