package ai.djl.memopt.gguf;

import java.io.EOFException;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.MappedByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;

/**
 * A GGUF file (version 2 or 3) opened for reading: the header, metadata and tensor table are parsed and validated on
 * {@link #open}; tensor data is read later, one tensor (or one slice of one) at a time, through a memory mapping of
 * just that region, so files larger than 2 GiB work and nothing is copied whole.
 *
 * <p>Validation names the file and what is wrong: a truncated file, a wrong magic or version, a string or array longer
 * than the file, an unknown or unsupported tensor type, a tensor whose offset is not aligned or whose bytes lie
 * outside the file, a duplicate name.
 *
 * <pre>{@code
 * try (GgufFile f = GgufFile.open(Path.of("model.gguf"))) {
 *     String arch = f.string("general.architecture").orElseThrow();
 *     GgufTensorInfo t = f.tensor("token_embd.weight");
 *     float[] values = f.readFloats(t, 0, t.numel());
 * }
 * }</pre>
 */
public final class GgufFile implements AutoCloseable {

    /** "GGUF" read as a little-endian uint32. */
    public static final int MAGIC = 0x46554747;
    /** The version this package writes. */
    public static final int VERSION = 3;
    /** The alignment of tensor data when {@code general.alignment} is absent. */
    public static final int DEFAULT_ALIGNMENT = 32;

    private static final int MAX_DIMS = 4;

    private final Path path;
    private final FileChannel channel;
    private final int version;
    private final Map<String, GgufValue> metadata;
    private final Map<String, GgufTensorInfo> tensors;
    private final long dataStart;

    private GgufFile(Path path, FileChannel channel, int version, Map<String, GgufValue> metadata,
            Map<String, GgufTensorInfo> tensors, long dataStart) {
        this.path = path;
        this.channel = channel;
        this.version = version;
        this.metadata = metadata;
        this.tensors = tensors;
        this.dataStart = dataStart;
    }

    /** Whether {@code path} is a regular file that starts with the GGUF magic. */
    public static boolean isGguf(Path path) {
        if (!java.nio.file.Files.isRegularFile(path)) {
            return false;
        }
        try (FileChannel ch = FileChannel.open(path, StandardOpenOption.READ)) {
            ByteBuffer b = ByteBuffer.allocate(4).order(ByteOrder.LITTLE_ENDIAN);
            while (b.hasRemaining() && ch.read(b) > 0) {
                // read the 4 magic bytes
            }
            return !b.hasRemaining() && b.getInt(0) == MAGIC;
        } catch (IOException e) {
            return false;
        }
    }

    /**
     * Opens and validates a GGUF file.
     *
     * @throws GgufFormatException naming the file and the problem
     * @throws IOException if the file cannot be read
     */
    public static GgufFile open(Path path) throws IOException {
        FileChannel channel;
        try {
            channel = FileChannel.open(path, StandardOpenOption.READ);
        } catch (NoSuchFileException e) {
            throw new NoSuchFileException(path.toString(), null, "GGUF file not found");
        }
        try {
            return parse(path, channel);
        } catch (IOException | RuntimeException e) {
            channel.close();
            throw e;
        }
    }

    private static GgufFile parse(Path path, FileChannel channel) throws IOException {
        long size = channel.size();
        Cursor c = new Cursor(path, channel, size);
        if (size < 24) {
            throw new GgufFormatException(path + ": truncated GGUF file (" + size + " bytes, the header alone is 24)");
        }
        int magic = c.i32("magic");
        if (magic != MAGIC) {
            throw new GgufFormatException(path + ": not a GGUF file (magic 0x" + Integer.toHexString(magic)
                    + ", expected 0x" + Integer.toHexString(MAGIC) + " \"GGUF\")");
        }
        int version = c.i32("version");
        if (version != 2 && version != 3) {
            throw new GgufFormatException(path + ": GGUF version " + version + " is not supported (2 or 3)");
        }
        long nTensors = c.u64("tensor count");
        long nKv = c.u64("metadata count");
        // every tensor entry takes at least 24 bytes and every metadata entry 12: a larger count is corrupt
        if (nTensors > size / 24 || nKv > size / 12) {
            throw new GgufFormatException(path + ": truncated or corrupt header: " + nTensors + " tensors and " + nKv
                    + " metadata entries cannot fit in " + size + " bytes");
        }
        Map<String, GgufValue> metadata = new LinkedHashMap<>();
        for (long i = 0; i < nKv; i++) {
            String key = c.string("metadata key #" + i);
            int typeId = c.i32("type of '" + key + "'");
            GgufValueType type = GgufValueType.fromId(typeId);
            if (type == null) {
                throw new GgufFormatException(path + ": metadata '" + key + "' has unknown value type " + typeId);
            }
            GgufValue value = readValue(c, key, type);
            if (metadata.put(key, value) != null) {
                throw new GgufFormatException(path + ": duplicate metadata key '" + key + "'");
            }
        }
        long alignment = DEFAULT_ALIGNMENT;
        GgufValue a = metadata.get("general.alignment");
        if (a != null) {
            if (a.type() != GgufValueType.UINT32 || a.asLong() == 0 || Long.bitCount(a.asLong()) != 1) {
                throw new GgufFormatException(path + ": general.alignment must be a UINT32 power of two, got " + a);
            }
            alignment = a.asLong();
        }
        List<long[]> raw = new ArrayList<>();
        List<String> names = new ArrayList<>();
        List<Integer> types = new ArrayList<>();
        for (long i = 0; i < nTensors; i++) {
            String name = c.string("tensor name #" + i);
            int nDims = c.i32("dimensions of tensor '" + name + "'");
            if (nDims < 1 || nDims > MAX_DIMS) {
                throw new GgufFormatException(path + ": tensor '" + name + "' has " + nDims
                        + " dimensions (1 to " + MAX_DIMS + " expected)");
            }
            long[] ne = new long[nDims + 1];
            for (int d = 0; d < nDims; d++) {
                ne[d] = c.u64("dimension " + d + " of tensor '" + name + "'");
                if (ne[d] <= 0 || ne[d] > size * 2) {
                    throw new GgufFormatException(path + ": tensor '" + name + "' has dimension " + d + " = " + ne[d]);
                }
            }
            types.add(c.i32("type of tensor '" + name + "'"));
            ne[nDims] = c.u64("offset of tensor '" + name + "'");
            names.add(name);
            raw.add(ne);
        }
        long dataStart = align(c.position(), alignment);
        Map<String, GgufTensorInfo> tensors = new LinkedHashMap<>();
        for (int i = 0; i < names.size(); i++) {
            String name = names.get(i);
            long[] r = raw.get(i);
            long[] ne = java.util.Arrays.copyOf(r, r.length - 1);
            long offset = r[r.length - 1];
            int typeId = types.get(i);
            GgmlType type = GgmlType.fromId(typeId).orElseThrow(() -> new GgufFormatException(path + ": tensor '"
                    + name + "' has type " + GgmlType.nameOf(typeId) + " (" + typeId
                    + "), which this reader does not support (F32, F16, BF16, Q8_0, Q4_0)"));
            if (ne[0] % type.blockSize() != 0) {
                throw new GgufFormatException(path + ": tensor '" + name + "' of type " + type + " has rows of "
                        + ne[0] + " values, not a multiple of its block size " + type.blockSize());
            }
            if (offset % alignment != 0) {
                throw new GgufFormatException(path + ": tensor '" + name + "' data offset " + offset
                        + " is not aligned to " + alignment + " bytes (misaligned data)");
            }
            long rows = 1;
            for (int d = 1; d < ne.length; d++) {
                rows = Math.multiplyExact(rows, ne[d]);
            }
            long bytes = Math.multiplyExact(type.rowBytes(ne[0]), rows);
            long start = dataStart + offset;
            if (offset < 0 || start + bytes > size || start + bytes < start) {
                throw new GgufFormatException(path + ": truncated: tensor '" + name + "' needs bytes [" + start + ", "
                        + (start + bytes) + ") but the file has " + size);
            }
            if (tensors.put(name, new GgufTensorInfo(name, type, ne, start, bytes)) != null) {
                throw new GgufFormatException(path + ": duplicate tensor '" + name + "'");
            }
        }
        return new GgufFile(path, channel, version,
                Collections.unmodifiableMap(metadata), Collections.unmodifiableMap(tensors), dataStart);
    }

    private static GgufValue readValue(Cursor c, String key, GgufValueType type) throws IOException {
        if (type == GgufValueType.ARRAY) {
            int elemId = c.i32("element type of '" + key + "'");
            GgufValueType elem = GgufValueType.fromId(elemId);
            if (elem == null || elem == GgufValueType.ARRAY) {
                throw new GgufFormatException(c.path + ": metadata '" + key + "' is an array of unsupported type "
                        + elemId);
            }
            long n = c.u64("length of '" + key + "'");
            long minBytes = elem == GgufValueType.STRING ? 8 : elem.bytes();
            if (n > (c.size - c.position()) / minBytes) {
                throw new GgufFormatException(c.path + ": truncated: metadata array '" + key + "' of " + n + " "
                        + elem + " values does not fit in the file");
            }
            List<Object> values = new ArrayList<>((int) n);
            for (long i = 0; i < n; i++) {
                values.add(readScalar(c, key + "[" + i + "]", elem));
            }
            return GgufValue.of(type, elem, Collections.unmodifiableList(values));
        }
        return GgufValue.of(type, null, readScalar(c, key, type));
    }

    private static Object readScalar(Cursor c, String what, GgufValueType type) throws IOException {
        switch (type) {
            case UINT8:
                return (long) (c.bytes(1, what).get() & 0xff);
            case INT8:
                return (long) c.bytes(1, what).get();
            case UINT16:
                return (long) (c.bytes(2, what).getShort() & 0xffff);
            case INT16:
                return (long) c.bytes(2, what).getShort();
            case UINT32:
                return c.i32(what) & 0xffffffffL;
            case INT32:
                return (long) c.i32(what);
            case FLOAT32:
                return c.bytes(4, what).getFloat();
            case BOOL:
                byte b = c.bytes(1, what).get();
                if (b != 0 && b != 1) {
                    throw new GgufFormatException(c.path + ": metadata '" + what + "' is a bool with byte " + b);
                }
                return b == 1;
            case STRING:
                return c.string(what);
            case UINT64:
            case INT64:
                return c.bytes(8, what).getLong();
            case FLOAT64:
                return c.bytes(8, what).getDouble();
            default:
                throw new GgufFormatException(c.path + ": metadata '" + what + "' has unsupported type " + type);
        }
    }

    static long align(long offset, long alignment) {
        return (offset + alignment - 1) / alignment * alignment;
    }

    public Path path() {
        return path;
    }

    public int version() {
        return version;
    }

    /** Absolute offset where tensor data starts. */
    public long dataStart() {
        return dataStart;
    }

    /** Every metadata entry, in file order. */
    public Map<String, GgufValue> metadata() {
        return metadata;
    }

    /** A metadata entry. */
    public Optional<GgufValue> get(String key) {
        return Optional.ofNullable(metadata.get(key));
    }

    /** A string metadata entry (empty if absent; an error if of another type). */
    public Optional<String> string(String key) throws GgufFormatException {
        GgufValue v = metadata.get(key);
        if (v == null) {
            return Optional.empty();
        }
        if (v.type() != GgufValueType.STRING) {
            throw new GgufFormatException(path + ": metadata '" + key + "' is " + v.type() + ", expected STRING");
        }
        return Optional.of(v.asString());
    }

    /** Every tensor entry, in file order. */
    public Map<String, GgufTensorInfo> tensors() {
        return tensors;
    }

    /**
     * A tensor entry.
     *
     * @throws GgufFormatException naming the file and tensor if it is missing
     */
    public GgufTensorInfo tensor(String name) throws GgufFormatException {
        GgufTensorInfo t = tensors.get(name);
        if (t == null) {
            throw new GgufFormatException(path + ": missing tensor '" + name + "'");
        }
        return t;
    }

    /**
     * Maps {@code length} bytes of a tensor's data from byte {@code from} (read-only, little-endian).
     *
     * @throws IllegalArgumentException if the range is outside the tensor or longer than 2 GiB
     */
    public ByteBuffer bytes(GgufTensorInfo t, long from, long length) throws IOException {
        if (from < 0 || length < 0 || from + length > t.byteLength() || length > Integer.MAX_VALUE) {
            throw new IllegalArgumentException(path + ": bytes [" + from + ", " + (from + length)
                    + ") outside tensor '" + t.name() + "' of " + t.byteLength() + " bytes (or over 2 GiB at once)");
        }
        MappedByteBuffer m = channel.map(FileChannel.MapMode.READ_ONLY, t.fileOffset() + from, length);
        return m.order(ByteOrder.LITTLE_ENDIAN);
    }

    /** Decodes {@code count} values of a tensor from value {@code first} (both multiples of its block size). */
    public float[] readFloats(GgufTensorInfo t, long first, long count) throws IOException {
        int block = t.type().blockSize();
        if (first % block != 0 || count % block != 0) {
            throw new IllegalArgumentException(t.name() + ": a " + t.type() + " range must start and end on a block of "
                    + block);
        }
        long fromByte = first / block * t.type().blockBytes();
        long lengthBytes = count / block * t.type().blockBytes();
        return GgmlQuants.dequantize(t.type(), bytes(t, fromByte, lengthBytes), Math.toIntExact(count));
    }

    @Override
    public void close() throws IOException {
        channel.close();
    }

    @Override
    public String toString() {
        return "GgufFile{" + path + ", v" + version + ", " + metadata.size() + " keys, " + tensors.size() + " tensors}";
    }

    /** Sequential little-endian reads with bounds checked against the file size. */
    private static final class Cursor {
        private final Path path;
        private final FileChannel channel;
        private final long size;
        private final ByteBuffer buf = ByteBuffer.allocate(1 << 16).order(ByteOrder.LITTLE_ENDIAN);
        private long bufStart;

        Cursor(Path path, FileChannel channel, long size) {
            this.path = path;
            this.channel = channel;
            this.size = size;
            buf.limit(0);
        }

        long position() {
            return bufStart + buf.position();
        }

        /** A view of the next {@code n} bytes (n at most the buffer size), advancing past them. */
        ByteBuffer bytes(int n, String what) throws IOException {
            ensure(n, what);
            ByteBuffer view = buf.slice().order(ByteOrder.LITTLE_ENDIAN);
            view.limit(n);
            buf.position(buf.position() + n);
            return view;
        }

        private void ensure(long n, String what) throws IOException {
            if (position() + n > size) {
                throw new GgufFormatException(path + ": truncated GGUF file: reading " + what + " at byte " + position()
                        + " needs " + n + " bytes, the file has " + size);
            }
            if (buf.remaining() >= n) {
                return;
            }
            long pos = position();
            bufStart = pos;
            ByteBuffer fill = ByteBuffer.wrap(buf.array());
            int want = (int) Math.min(buf.capacity(), size - pos);
            while (fill.position() < want) {
                int r = channel.read(fill, pos + fill.position());
                if (r < 0) {
                    throw new EOFException(path + ": unexpected end of file at byte " + (pos + fill.position()));
                }
            }
            buf.position(0);
            buf.limit(want);
        }

        int i32(String what) throws IOException {
            return bytes(4, what).getInt();
        }

        long u64(String what) throws IOException {
            long v = bytes(8, what).getLong();
            if (v < 0) {
                throw new GgufFormatException(path + ": " + what + " is " + Long.toUnsignedString(v)
                        + ", too large");
            }
            return v;
        }

        String string(String what) throws IOException {
            long n = u64("length of " + what);
            if (n > size - position()) {
                throw new GgufFormatException(path + ": truncated GGUF file: " + what + " is a string of " + n
                        + " bytes at byte " + position() + ", the file has " + size);
            }
            byte[] out = new byte[Math.toIntExact(n)];
            int done = 0;
            while (done < out.length) {
                int chunk = Math.min(out.length - done, buf.capacity());
                bytes(chunk, what).get(out, done, chunk);
                done += chunk;
            }
            // lenient: some converters write byte tokens that are not valid UTF-8 on their own
            return new String(out, StandardCharsets.UTF_8);
        }
    }
}
