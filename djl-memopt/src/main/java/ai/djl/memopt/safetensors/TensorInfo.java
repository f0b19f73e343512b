package ai.djl.memopt.safetensors;

import ai.djl.ndarray.types.Shape;
import java.util.Arrays;

/**
 * One tensor's entry in a safetensors header: name, type, shape and where its bytes are in the file.
 *
 * <p>{@code shape} is copied in and out; {@code equals} compares the array by reference, so an entry equals only
 * itself.
 *
 * @param name tensor name
 * @param dtype safetensors type
 * @param shape dimensions, outermost first (a copy is kept and handed out)
 * @param fileOffset absolute offset of the first byte of data in the file
 * @param byteLength bytes of data
 */
public record TensorInfo(String name, SafetensorsDType dtype, long[] shape, long fileOffset, long byteLength) {

    /** Keeps a copy of {@code shape}. */
    public TensorInfo {
        shape = shape.clone();
    }

    @Override
    public long[] shape() {
        return shape.clone();
    }

    public Shape djlShape() {
        return new Shape(shape);
    }

    public long numel() {
        return Arrays.stream(shape).reduce(1, (a, b) -> a * b);
    }

    @Override
    public String toString() {
        return name + " " + dtype + Arrays.toString(shape);
    }
}
