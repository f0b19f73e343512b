package ai.djl.memopt.gguf;

import java.util.Arrays;

/**
 * One tensor entry of a GGUF file: name, type, dimensions in ggml's order ({@code ne[0]} is the contiguous one, so a
 * PyTorch weight {@code (out, in)} has {@code ne = [in, out]}) and where its bytes lie.
 */
public final class GgufTensorInfo {

    private final String name;
    private final GgmlType type;
    private final long[] ne;
    private final long fileOffset;
    private final long byteLength;

    GgufTensorInfo(String name, GgmlType type, long[] ne, long fileOffset, long byteLength) {
        this.name = name;
        this.type = type;
        this.ne = ne.clone();
        this.fileOffset = fileOffset;
        this.byteLength = byteLength;
    }

    public String name() {
        return name;
    }

    public GgmlType type() {
        return type;
    }

    /** Dimensions, innermost first. */
    public long[] ne() {
        return ne.clone();
    }

    /** Dimensions outermost first, as PyTorch and DJL write shapes. */
    public long[] shape() {
        long[] s = new long[ne.length];
        for (int i = 0; i < ne.length; i++) {
            s[i] = ne[ne.length - 1 - i];
        }
        return s;
    }

    public long numel() {
        long n = 1;
        for (long d : ne) {
            n *= d;
        }
        return n;
    }

    /** Absolute offset of the first data byte. */
    public long fileOffset() {
        return fileOffset;
    }

    public long byteLength() {
        return byteLength;
    }

    /** Bytes of one row ({@code ne[0]} values). */
    public long rowBytes() {
        return type.rowBytes(ne[0]);
    }

    @Override
    public String toString() {
        return name + " " + type + Arrays.toString(ne);
    }
}
