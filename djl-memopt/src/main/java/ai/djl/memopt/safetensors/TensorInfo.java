package ai.djl.memopt.safetensors;

import ai.djl.ndarray.types.Shape;
import java.util.Arrays;

/** One tensor's entry in a safetensors header: name, type, shape and where its bytes are in the file. */
public final class TensorInfo {

    private final String name;
    private final SafetensorsDType dtype;
    private final long[] shape;
    private final long fileOffset;
    private final long byteLength;

    TensorInfo(String name, SafetensorsDType dtype, long[] shape, long fileOffset, long byteLength) {
        this.name = name;
        this.dtype = dtype;
        this.shape = shape.clone();
        this.fileOffset = fileOffset;
        this.byteLength = byteLength;
    }

    public String name() {
        return name;
    }

    public SafetensorsDType dtype() {
        return dtype;
    }

    public long[] shape() {
        return shape.clone();
    }

    public Shape djlShape() {
        return new Shape(shape);
    }

    public long numel() {
        long n = 1;
        for (long d : shape) {
            n *= d;
        }
        return n;
    }

    /** Absolute offset of the first byte of data in the file. */
    public long fileOffset() {
        return fileOffset;
    }

    public long byteLength() {
        return byteLength;
    }

    @Override
    public String toString() {
        return name + " " + dtype + Arrays.toString(shape);
    }
}
