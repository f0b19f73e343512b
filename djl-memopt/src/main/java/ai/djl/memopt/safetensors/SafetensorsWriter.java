package ai.djl.memopt.safetensors;

import ai.djl.ndarray.NDArray;
import com.google.common.base.Preconditions;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.function.Supplier;

/**
 * Writes a safetensors file tensor by tensor, atomically: the data goes to a temporary file in the target's directory,
 * is forced to disk, and only then renamed over the target, so a crash never leaves a half-written file.
 *
 * <p>Tensors added from a {@link Supplier} are materialised one at a time while writing, so a model can be saved
 * without holding a second copy of it in memory.
 *
 * <pre>{@code
 * new SafetensorsWriter()
 *         .add("model.embed_tokens.weight", embedding)
 *         .putMetadata("format", "pt")
 *         .write(dir.resolve("model.safetensors"));
 * }</pre>
 */
public final class SafetensorsWriter {

    private final List<Entry> entries = new ArrayList<>();
    private final Set<String> names = new LinkedHashSet<>();
    private final Map<String, String> metadata = new LinkedHashMap<>();

    private static final class Entry {
        final String name;
        final SafetensorsDType dtype;
        final long[] shape;
        final Supplier<ByteBuffer> data;
        final long byteLength;

        Entry(String name, SafetensorsDType dtype, long[] shape, Supplier<ByteBuffer> data) {
            this.name = name;
            this.dtype = dtype;
            this.shape = shape.clone();
            this.data = data;
            long numel = 1;
            for (long d : shape) {
                Preconditions.checkArgument(d >= 0, "tensor '%s': negative dimension %s", name, d);
                numel = Math.multiplyExact(numel, d);
            }
            this.byteLength = numel * dtype.byteSize();
        }
    }

    /** Adds an array; its bytes are read when the file is written (arrays on a GPU are copied to the host then). */
    public SafetensorsWriter add(String name, NDArray array) {
        SafetensorsDType dtype = SafetensorsDType.of(array.getDataType());
        return add(name, dtype, array.getShape().getShape(), array::toByteBuffer);
    }

    /** Adds raw little-endian bytes of the given type and shape. */
    public SafetensorsWriter add(String name, SafetensorsDType dtype, long[] shape, ByteBuffer data) {
        ByteBuffer copy = data.duplicate();
        return add(name, dtype, shape, () -> copy.duplicate());
    }

    /** Adds a tensor whose bytes are produced only when written (one at a time), e.g. by quantizing a layer. */
    public SafetensorsWriter add(String name, SafetensorsDType dtype, long[] shape, Supplier<ByteBuffer> data) {
        Preconditions.checkArgument(!"__metadata__".equals(name), "'__metadata__' is reserved");
        Preconditions.checkArgument(names.add(name), "tensor '%s' added twice", name);
        entries.add(new Entry(name, dtype, shape, data));
        return this;
    }

    /** Adds a string to the header's {@code __metadata__}. */
    public SafetensorsWriter putMetadata(String key, String value) {
        metadata.put(Preconditions.checkNotNull(key), Preconditions.checkNotNull(value, "metadata '%s'", key));
        return this;
    }

    /** Number of tensors added. */
    public int size() {
        return entries.size();
    }

    /**
     * Writes the file atomically.
     *
     * @throws IOException if writing fails (the target is then left as it was)
     * @throws IllegalStateException if a tensor's bytes do not match its declared type and shape
     */
    public void write(Path target) throws IOException {
        byte[] header = header();
        AtomicFiles.write(target, tmp -> {
            try (FileChannel out = FileChannel.open(tmp, StandardOpenOption.WRITE,
                    StandardOpenOption.TRUNCATE_EXISTING)) {
                ByteBuffer len = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(header.length);
                writeFully(out, len.flip());
                writeFully(out, ByteBuffer.wrap(header));
                for (Entry e : entries) {
                    ByteBuffer data = e.data.get().duplicate();
                    if (data.remaining() != e.byteLength) {
                        throw new IllegalStateException("tensor '" + e.name + "' produced " + data.remaining()
                                + " bytes, expected " + e.byteLength + " for " + e.dtype
                                + java.util.Arrays.toString(e.shape));
                    }
                    writeFully(out, data);
                }
            }
        });
    }

    private byte[] header() {
        JsonObject json = new JsonObject();
        if (!metadata.isEmpty()) {
            JsonObject meta = new JsonObject();
            metadata.forEach(meta::addProperty);
            json.add("__metadata__", meta);
        }
        long offset = 0;
        for (Entry e : entries) {
            JsonObject t = new JsonObject();
            t.addProperty("dtype", e.dtype.name());
            JsonArray shape = new JsonArray();
            for (long d : e.shape) {
                shape.add(d);
            }
            t.add("shape", shape);
            JsonArray offsets = new JsonArray();
            offsets.add(offset);
            offsets.add(offset + e.byteLength);
            t.add("data_offsets", offsets);
            json.add(e.name, t);
            offset += e.byteLength;
        }
        byte[] text = json.toString().getBytes(StandardCharsets.UTF_8);
        // pad with spaces so the data section starts 8-byte aligned, as the reference implementation does
        int padded = (text.length + 7) / 8 * 8;
        byte[] out = new byte[padded];
        System.arraycopy(text, 0, out, 0, text.length);
        for (int i = text.length; i < padded; i++) {
            out[i] = ' ';
        }
        return out;
    }

    private static void writeFully(FileChannel out, ByteBuffer buf) throws IOException {
        while (buf.hasRemaining()) {
            out.write(buf);
        }
    }
}
