package ai.djl.memopt.gguf;

import ai.djl.memopt.safetensors.AtomicFiles;
import com.google.common.base.Preconditions;
import java.io.BufferedOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Writes a GGUF version 3 file: metadata, the tensor table, then each tensor's data aligned to
 * {@link GgufFile#DEFAULT_ALIGNMENT} bytes, produced by a callback when its turn comes (so a model larger than memory
 * streams through). The file is written to a temporary sibling and renamed into place: a crash leaves the old file or
 * none, never half a file.
 *
 * <pre>{@code
 * GgufWriter w = new GgufWriter();
 * w.put("general.architecture", GgufValue.string("deepseek2"));
 * w.addTensor("output_norm.weight", GgmlType.F32, new long[] {64}, out -> out.write(GgmlQuants.quantize(F32, norm)));
 * w.write(Path.of("model.gguf"));
 * }</pre>
 */
public final class GgufWriter {

    /** Produces one tensor's bytes, exactly as many as its type and dimensions take. */
    @FunctionalInterface
    public interface TensorData {
        void writeTo(OutputStream out) throws IOException;
    }

    private record Entry(String name, GgmlType type, long[] ne, long bytes, TensorData data) {}

    private final Map<String, GgufValue> metadata = new LinkedHashMap<>();
    private final List<Entry> tensors = new ArrayList<>();

    /** Sets a metadata entry (replacing an earlier value of the same key, keeping its place). */
    public GgufWriter put(String key, GgufValue value) {
        Preconditions.checkArgument(key != null && !key.isEmpty(), "metadata key must not be empty");
        metadata.put(key, Preconditions.checkNotNull(value, "value of %s", key));
        return this;
    }

    /**
     * Adds a tensor.
     *
     * @param ne dimensions innermost first (a PyTorch {@code (out, in)} weight is {@code {in, out}})
     * @throws IllegalArgumentException for a duplicate name or rows that are not whole blocks of {@code type}
     */
    public GgufWriter addTensor(String name, GgmlType type, long[] ne, TensorData data) {
        Preconditions.checkArgument(tensors.stream().noneMatch(e -> e.name.equals(name)), "duplicate tensor '%s'",
                name);
        Preconditions.checkArgument(ne.length >= 1 && ne.length <= 4, "tensor '%s' needs 1 to 4 dimensions", name);
        long rows = 1;
        for (int i = 1; i < ne.length; i++) {
            rows *= ne[i];
        }
        long bytes;
        try {
            bytes = type.rowBytes(ne[0]) * rows;
        } catch (IllegalArgumentException e) {
            throw new IllegalArgumentException("tensor '" + name + "': " + e.getMessage(), e);
        }
        tensors.add(new Entry(name, type, ne.clone(), bytes, data));
        return this;
    }

    /** Whether a metadata key is set. */
    public boolean has(String key) {
        return metadata.containsKey(key);
    }

    /** Number of tensors added. */
    public int tensorCount() {
        return tensors.size();
    }

    /** Writes the file atomically. */
    public void write(Path target) throws IOException {
        AtomicFiles.write(target, tmp -> {
            try (OutputStream os = new BufferedOutputStream(Files.newOutputStream(tmp), 1 << 20)) {
                writeTo(os);
            }
        });
    }

    private void writeTo(OutputStream raw) throws IOException {
        CountingStream out = new CountingStream(raw);
        out.write(le(8).putInt(GgufFile.MAGIC).putInt(GgufFile.VERSION));
        out.write(le(16).putLong(tensors.size()).putLong(metadata.size()));
        for (Map.Entry<String, GgufValue> e : metadata.entrySet()) {
            string(out, e.getKey());
            GgufValue v = e.getValue();
            out.write(le(4).putInt(v.type().id()));
            if (v.type() == GgufValueType.ARRAY) {
                out.write(le(12).putInt(v.elementType().id()).putLong(v.asList().size()));
                for (Object o : v.asList()) {
                    scalar(out, v.elementType(), o, e.getKey());
                }
            } else {
                scalar(out, v.type(), v.value(), e.getKey());
            }
        }
        long offset = 0;
        for (Entry t : tensors) {
            string(out, t.name);
            out.write(le(4).putInt(t.ne.length));
            ByteBuffer dims = le(8 * t.ne.length);
            for (long d : t.ne) {
                dims.putLong(d);
            }
            out.write(dims);
            out.write(le(12).putInt(t.type.id()).putLong(offset));
            offset = GgufFile.align(offset + t.bytes, GgufFile.DEFAULT_ALIGNMENT);
        }
        pad(out);
        long dataStart = out.count;
        for (Entry t : tensors) {
            long before = out.count;
            t.data.writeTo(out);
            long written = out.count - before;
            if (written != t.bytes) {
                throw new IOException("tensor '" + t.name + "' (" + t.type + " " + java.util.Arrays.toString(t.ne)
                        + ") wrote " + written + " bytes, expected " + t.bytes);
            }
            pad(out);
        }
        assert out.count - dataStart == offset;
    }

    private static void pad(CountingStream out) throws IOException {
        long aligned = GgufFile.align(out.count, GgufFile.DEFAULT_ALIGNMENT);
        out.write(new byte[(int) (aligned - out.count)]);
    }

    private static void string(CountingStream out, String s) throws IOException {
        byte[] b = s.getBytes(StandardCharsets.UTF_8);
        out.write(le(8).putLong(b.length));
        out.write(b);
    }

    private static void scalar(CountingStream out, GgufValueType type, Object o, String key) throws IOException {
        switch (type) {
            case UINT8:
            case INT8:
                out.write(new byte[] {(byte) (long) (Long) o});
                break;
            case UINT16:
            case INT16:
                out.write(le(2).putShort((short) (long) (Long) o));
                break;
            case UINT32:
            case INT32:
                out.write(le(4).putInt((int) (long) (Long) o));
                break;
            case UINT64:
            case INT64:
                out.write(le(8).putLong((Long) o));
                break;
            case FLOAT32:
                out.write(le(4).putFloat(((Number) o).floatValue()));
                break;
            case FLOAT64:
                out.write(le(8).putDouble(((Number) o).doubleValue()));
                break;
            case BOOL:
                out.write(new byte[] {(byte) ((Boolean) o ? 1 : 0)});
                break;
            case STRING:
                string(out, (String) o);
                break;
            default:
                throw new IllegalArgumentException("metadata '" + key + "': cannot write " + type);
        }
    }

    private static ByteBuffer le(int n) {
        return ByteBuffer.allocate(n).order(ByteOrder.LITTLE_ENDIAN);
    }

    /** Counts bytes so that padding and tensor sizes can be checked. */
    private static final class CountingStream extends OutputStream {
        private final OutputStream out;
        private long count;

        CountingStream(OutputStream out) {
            this.out = out;
        }

        void write(ByteBuffer filled) throws IOException {
            write(filled.array(), 0, filled.position());
        }

        @Override
        public void write(int b) throws IOException {
            out.write(b);
            count++;
        }

        @Override
        public void write(byte[] b, int off, int len) throws IOException {
            out.write(b, off, len);
            count += len;
        }
    }
}
