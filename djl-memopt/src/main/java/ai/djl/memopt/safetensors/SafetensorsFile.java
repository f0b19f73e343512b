package ai.djl.memopt.safetensors;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableMap;
import com.google.common.collect.ImmutableSortedSet;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.SortedSet;

/**
 * A safetensors file read one tensor at a time through a memory mapping: the file is never copied whole, so shards of
 * many GiB work (DJL's {@code NDList.decode} copies the whole file into one {@code byte[]}, limited to 2 GiB).
 *
 * <p>The header is validated when the file is opened: every tensor's type is known, its shape matches its byte length
 * and its bytes lie inside the file. Errors name the file and the tensor.
 *
 * <pre>{@code
 * try (SafetensorsFile file = SafetensorsFile.open(Path.of("model.safetensors"))) {
 *     NDArray w = file.load(manager, "model.embed_tokens.weight", DataType.FLOAT32); // BF16 converted in Java
 * }
 * }</pre>
 */
public final class SafetensorsFile implements AutoCloseable {

    /** The format's own bound on the header (100 MB), which also keeps a corrupt length from allocating gigabytes. */
    static final long MAX_HEADER_BYTES = 100L * 1000 * 1000;

    private final Path path;
    private final FileChannel channel;
    private final long dataStart;
    private final Map<String, TensorInfo> tensors;
    private final Map<String, String> metadata;

    private SafetensorsFile(Path path, FileChannel channel, long dataStart, Map<String, TensorInfo> tensors,
            Map<String, String> metadata) {
        this.path = path;
        this.channel = channel;
        this.dataStart = dataStart;
        this.tensors = tensors;
        this.metadata = metadata;
    }

    /**
     * Opens and validates a safetensors file.
     *
     * @throws SafetensorsFormatException if the file is truncated, its header is corrupt or a tensor entry is invalid
     * @throws IOException if the file cannot be read
     */
    public static SafetensorsFile open(Path path) throws IOException {
        FileChannel channel;
        try {
            channel = FileChannel.open(path, StandardOpenOption.READ);
        } catch (NoSuchFileException e) {
            throw new NoSuchFileException(path.toString(), null, "safetensors file not found");
        }
        try {
            return parse(path, channel);
        } catch (IOException | RuntimeException e) {
            channel.close();
            throw e;
        }
    }

    private static SafetensorsFile parse(Path path, FileChannel channel) throws IOException {
        long size = channel.size();
        if (size < 8) {
            throw new SafetensorsFormatException(path + ": truncated safetensors file (" + size
                    + " bytes, fewer than the 8-byte header length)");
        }
        ByteBuffer lengthBuf = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN);
        readFully(channel, lengthBuf, 0, path);
        long headerLength = lengthBuf.flip().getLong();
        if (headerLength <= 0 || headerLength > MAX_HEADER_BYTES) {
            throw new SafetensorsFormatException(path + ": corrupt safetensors header length " + headerLength
                    + " (expected 1.." + MAX_HEADER_BYTES + ")");
        }
        if (8 + headerLength > size) {
            throw new SafetensorsFormatException(path + ": truncated safetensors file: header of " + headerLength
                    + " bytes runs past the end of the file (" + size + " bytes)");
        }
        ByteBuffer headerBuf = ByteBuffer.allocate((int) headerLength);
        readFully(channel, headerBuf, 8, path);
        String headerText = new String(headerBuf.array(), StandardCharsets.UTF_8);
        JsonObject header;
        try {
            JsonElement parsed = JsonParser.parseString(headerText);
            if (!parsed.isJsonObject()) {
                throw new SafetensorsFormatException(path + ": corrupt safetensors header: not a JSON object");
            }
            header = parsed.getAsJsonObject();
        } catch (JsonParseException e) {
            throw new SafetensorsFormatException(path + ": corrupt safetensors header: " + e.getMessage(), e);
        }
        long dataStart = 8 + headerLength;
        long dataSize = size - dataStart;
        Map<String, TensorInfo> tensors = new LinkedHashMap<>();
        Map<String, String> metadata = new LinkedHashMap<>();
        for (Map.Entry<String, JsonElement> e : header.entrySet()) {
            String name = e.getKey();
            if ("__metadata__".equals(name)) {
                if (!e.getValue().isJsonObject()) {
                    throw new SafetensorsFormatException(path + ": __metadata__ is not a JSON object");
                }
                for (Map.Entry<String, JsonElement> m : e.getValue().getAsJsonObject().entrySet()) {
                    if (!m.getValue().isJsonPrimitive() || !m.getValue().getAsJsonPrimitive().isString()) {
                        throw new SafetensorsFormatException(
                                path + ": __metadata__ value of '" + m.getKey() + "' is not a string");
                    }
                    metadata.put(m.getKey(), m.getValue().getAsString());
                }
                continue;
            }
            tensors.put(name, parseEntry(path, name, e.getValue(), dataStart, dataSize));
        }
        return new SafetensorsFile(path, channel, dataStart, ImmutableMap.copyOf(tensors),
                ImmutableMap.copyOf(metadata));
    }

    private static TensorInfo parseEntry(Path path, String name, JsonElement value, long dataStart, long dataSize)
            throws SafetensorsFormatException {
        String where = path + ": tensor '" + name + "'";
        try {
            JsonObject entry = value.getAsJsonObject();
            String dtypeName = entry.get("dtype").getAsString();
            SafetensorsDType dtype = SafetensorsDType.parse(dtypeName);
            if (dtype == null) {
                throw new SafetensorsFormatException(where + ": unsupported dtype " + dtypeName
                        + " (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
            }
            var shapeJson = entry.get("shape").getAsJsonArray();
            long[] shape = new long[shapeJson.size()];
            long numel = 1;
            for (int i = 0; i < shape.length; i++) {
                shape[i] = shapeJson.get(i).getAsLong();
                if (shape[i] < 0) {
                    throw new SafetensorsFormatException(where + ": negative dimension " + shape[i]);
                }
                numel = Math.multiplyExact(numel, shape[i]);
            }
            var offsets = entry.get("data_offsets").getAsJsonArray();
            if (offsets.size() != 2) {
                throw new SafetensorsFormatException(where + ": data_offsets must have 2 entries, has "
                        + offsets.size());
            }
            long begin = offsets.get(0).getAsLong();
            long end = offsets.get(1).getAsLong();
            if (begin < 0 || end < begin) {
                throw new SafetensorsFormatException(where + ": invalid data_offsets [" + begin + ", " + end + "]");
            }
            if (end > dataSize) {
                throw new SafetensorsFormatException(where + ": data_offsets [" + begin + ", " + end
                        + "] point past the end of the file (data section holds " + dataSize
                        + " bytes): the file is truncated or its header is corrupt");
            }
            long expected = Math.multiplyExact(numel, (long) dtype.byteSize());
            if (end - begin != expected) {
                throw new SafetensorsFormatException(where + ": " + (end - begin) + " bytes of data but shape "
                        + java.util.Arrays.toString(shape) + " of " + dtype + " needs " + expected);
            }
            return new TensorInfo(name, dtype, shape, dataStart + begin, end - begin);
        } catch (IllegalStateException | NullPointerException | UnsupportedOperationException
                | ArithmeticException | NumberFormatException e) {
            throw new SafetensorsFormatException(where + ": malformed header entry " + value + " (" + e + ")", e);
        }
    }

    private static void readFully(FileChannel channel, ByteBuffer buf, long position, Path path) throws IOException {
        long pos = position;
        while (buf.hasRemaining()) {
            int n = channel.read(buf, pos);
            if (n < 0) {
                throw new SafetensorsFormatException(path + ": unexpected end of file at byte " + pos);
            }
            pos += n;
        }
    }

    public Path path() {
        return path;
    }

    /** Tensor names, sorted. */
    public SortedSet<String> names() {
        return ImmutableSortedSet.copyOf(tensors.keySet());
    }

    public boolean contains(String name) {
        return tensors.containsKey(name);
    }

    /** The header's {@code __metadata__} (empty if absent). */
    public Map<String, String> metadata() {
        return metadata;
    }

    /**
     * The header entry of a tensor.
     *
     * @throws IllegalArgumentException naming the file if there is no such tensor
     */
    public TensorInfo info(String name) {
        TensorInfo info = tensors.get(name);
        if (info == null) {
            throw new IllegalArgumentException(path + ": no tensor '" + name + "'");
        }
        return info;
    }

    /** Byte offset of the data section (for tools that verify or copy raw data). */
    public long dataStart() {
        return dataStart;
    }

    /**
     * A read-only, little-endian view of a tensor's bytes, memory-mapped (nothing is copied).
     *
     * @throws IOException if the tensor is larger than 2 GiB or the file cannot be mapped
     */
    public ByteBuffer bytes(String name) throws IOException {
        TensorInfo info = info(name);
        if (info.byteLength() > Integer.MAX_VALUE) {
            throw new SafetensorsFormatException(path + ": tensor '" + name + "' has " + info.byteLength()
                    + " bytes; tensors over 2 GiB are not supported");
        }
        if (info.byteLength() == 0) {
            return ByteBuffer.allocate(0).order(ByteOrder.LITTLE_ENDIAN);
        }
        checkOpen();
        return channel.map(FileChannel.MapMode.READ_ONLY, info.fileOffset(), info.byteLength())
                .order(ByteOrder.LITTLE_ENDIAN);
    }

    /**
     * A floating-point tensor's values as float32 (F16 and BF16 converted exactly, F64 rounded).
     *
     * @throws IllegalArgumentException if the tensor is not floating point
     */
    public float[] readFloats(String name) throws IOException {
        TensorInfo info = info(name);
        Preconditions.checkArgument(info.dtype().isFloating(), "%s: tensor '%s' is %s, not floating point",
                path, name, info.dtype());
        ByteBuffer src = bytes(name);
        int n = Math.toIntExact(info.numel());
        float[] out = new float[n];
        switch (info.dtype()) {
            case F32:
                src.asFloatBuffer().get(out);
                break;
            case F16:
                for (int i = 0; i < n; i++) {
                    out[i] = Halfs.f16ToFloat(src.getShort(2 * i));
                }
                break;
            case BF16:
                for (int i = 0; i < n; i++) {
                    out[i] = Halfs.bf16ToFloat(src.getShort(2 * i));
                }
                break;
            case F64:
                for (int i = 0; i < n; i++) {
                    out[i] = (float) src.getDouble(8 * i);
                }
                break;
            default:
                throw new AssertionError(info.dtype());
        }
        return out;
    }

    /**
     * Loads a tensor into a new array of {@link SafetensorsDType#loadedAs()} (BF16 becomes FLOAT32, I16 INT32).
     * The array owns a copy of the data: it never aliases the read-only mapping.
     */
    public NDArray load(NDManager manager, String name) throws IOException {
        TensorInfo info = info(name);
        ByteBuffer src = bytes(name);
        int n = Math.toIntExact(info.numel());
        ByteBuffer direct;
        switch (info.dtype()) {
            case BF16:
                direct = ByteBuffer.allocateDirect(4 * n).order(ByteOrder.nativeOrder());
                FloatBuffer fb = direct.asFloatBuffer();
                for (int i = 0; i < n; i++) {
                    fb.put(i, Halfs.bf16ToFloat(src.getShort(2 * i)));
                }
                break;
            case I16:
                direct = ByteBuffer.allocateDirect(4 * n).order(ByteOrder.nativeOrder());
                for (int i = 0; i < n; i++) {
                    direct.putInt(4 * i, src.getShort(2 * i));
                }
                break;
            default:
                direct = ByteBuffer.allocateDirect(src.remaining()).order(ByteOrder.nativeOrder());
                if (ByteOrder.nativeOrder() == ByteOrder.LITTLE_ENDIAN) {
                    direct.put(src);
                } else {
                    throw new UnsupportedOperationException("big-endian hosts are not supported");
                }
                direct.rewind();
        }
        return manager.create(direct, info.djlShape(), info.dtype().loadedAs());
    }

    /**
     * Loads a tensor converted to {@code target} (for example FLOAT16 or FLOAT32 for weights).
     *
     * @throws IllegalArgumentException for BFLOAT16 (it aborts the JVM in DJL 0.36: use FLOAT16 or FLOAT32)
     */
    public NDArray load(NDManager manager, String name, DataType target) throws IOException {
        checkTarget(target);
        NDArray loaded = load(manager, name);
        if (loaded.getDataType() == target) {
            return loaded;
        }
        try (NDArray ignored = loaded) {
            return loaded.toType(target, false);
        }
    }

    static void checkTarget(DataType target) {
        Preconditions.checkArgument(target != DataType.BFLOAT16 && target != DataType.INT16
                        && target != DataType.UINT16 && target != DataType.UINT32 && target != DataType.UINT64,
                "DataType %s aborts the JVM in DJL 0.36's PyTorch engine; load as FLOAT16 or FLOAT32 instead", target);
    }

    private void checkOpen() throws IOException {
        if (!channel.isOpen()) {
            throw new IOException(path + ": safetensors file is closed");
        }
    }

    @Override
    public void close() throws IOException {
        channel.close();
    }

    @Override
    public String toString() {
        return "SafetensorsFile[" + path + ", " + tensors.size() + " tensors]";
    }
}
