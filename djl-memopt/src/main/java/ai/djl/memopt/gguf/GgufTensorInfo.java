package ai.djl.memopt.gguf;

import java.util.Arrays;

/**
 * One tensor entry of a GGUF file: name, type, dimensions in ggml's order ({@code ne[0]} is the contiguous one, so a
 * PyTorch weight {@code (out, in)} has {@code ne = [in, out]}) and where its bytes lie.
 *
 * <p>{@code ne} is copied in and out; {@code equals} compares the array by reference, so an entry equals only
 * itself.
 *
 * @param name tensor name
 * @param type ggml type
 * @param ne dimensions, innermost first (a copy is kept and handed out)
 * @param fileOffset absolute offset of the first data byte
 * @param byteLength bytes of data
 */
public record GgufTensorInfo(String name, GgmlType type, long[] ne, long fileOffset, long byteLength) {

    /** Keeps a copy of {@code ne}. */
    public GgufTensorInfo {
        ne = ne.clone();
    }

    /** Dimensions, innermost first. */
    @Override
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
        return Arrays.stream(ne).reduce(1, (a, b) -> a * b);
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
