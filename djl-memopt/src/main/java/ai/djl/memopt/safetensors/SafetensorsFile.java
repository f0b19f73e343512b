package ai.djl.memopt.safetensors;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableSortedSet;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
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

    /**
     * System property that, set to {@code true}, lets floating tensors holding NaN or infinite values load (they are
     * refused by default, naming the tensor: a model with them computes NaN).
     */
    public static final String ALLOW_NON_FINITE = "memopt.allowNonFinite";

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
     *     (everything the reference implementation refuses: see {@link HeaderParser})
     * @throws IOException if the file cannot be read or is not a regular file (a FIFO would block forever)
     */
    public static SafetensorsFile open(Path path) throws IOException {
        RegularFiles.require(path, "safetensors file");
        FileChannel channel = FileChannel.open(path, StandardOpenOption.READ);
        try {
            HeaderParser.Header h = HeaderParser.parse(path, channel);
            return new SafetensorsFile(path, channel, h.dataStart, h.tensors, h.metadata);
        } catch (IOException | RuntimeException e) {
            channel.close();
            throw e;
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
     * Checks that a floating tensor holds no NaN or infinite value, without loading it (integer tensors pass).
     *
     * @throws SafetensorsFormatException naming the tensor, unless {@link #ALLOW_NON_FINITE} is set
     */
    public void checkFinite(String name) throws IOException {
        ByteBuffer src = bytes(name);
        try {
            NonFiniteValues.check(path, name, info(name).dtype(), src);
        } finally {
            MappedBuffers.unmap(src);
        }
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
        try {
            NonFiniteValues.check(path, name, info.dtype(), src);
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
        } finally {
            MappedBuffers.unmap(src);
        }
    }

    /**
     * Loads a tensor into a new array of {@link SafetensorsDType#loadedAs()} (BF16 becomes FLOAT32, I16 INT32).
     * The array's memory is libtorch's own ({@link OwnedArrays}), written once from the read-only mapping: it never
     * aliases the mapping or a Java buffer, so views and no-op conversions of it stay valid after it is closed.
     *
     * @throws SafetensorsFormatException naming the tensor if a floating tensor holds NaN or infinite values (unless
     *     {@link #ALLOW_NON_FINITE} is set)
     */
    public NDArray load(NDManager manager, String name) throws IOException {
        TensorInfo info = info(name);
        ByteBuffer src = bytes(name);
        try {
            NonFiniteValues.check(path, name, info.dtype(), src);
            switch (info.dtype()) {
                case BF16:
                    return OwnedArrays.create(manager, info.djlShape(), DataType.FLOAT32, (window, offset) -> {
                        int first = Math.toIntExact(offset / 4);
                        for (int i = 0, n = window.remaining() / 4; i < n; i++) {
                            window.putFloat(4 * i, Halfs.bf16ToFloat(src.getShort(2 * (first + i))));
                        }
                    });
                case I16:
                    return OwnedArrays.create(manager, info.djlShape(), DataType.INT32, (window, offset) -> {
                        int first = Math.toIntExact(offset / 4);
                        for (int i = 0, n = window.remaining() / 4; i < n; i++) {
                            window.putInt(4 * i, src.getShort(2 * (first + i)));
                        }
                    });
                default:
                    return OwnedArrays.copyOf(manager, src, info.djlShape(), info.dtype().loadedAs());
            }
        } finally {
            MappedBuffers.unmap(src); // its pages stop counting as resident now, not at the next GC
        }
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
