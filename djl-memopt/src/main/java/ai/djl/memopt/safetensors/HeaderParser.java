package ai.djl.memopt.safetensors;

import com.google.common.collect.ImmutableMap;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Reads and validates a safetensors header as the reference implementation (huggingface/safetensors,
 * {@code SafeTensors::read_metadata} and {@code Metadata::validate}) does, so that a file it refuses is refused here
 * too rather than loaded as something else than what was written:
 *
 * <ul>
 *   <li>an 8-byte little-endian length of at most 100 MB, then a header of valid UTF-8 holding one strict JSON object
 *       (a duplicate key anywhere is refused: serde would keep the last of two tensors of the same name);
 *   <li>every tensor has a known dtype, non-negative dimensions and exactly the bytes its shape needs;
 *   <li>sorted by offsets, the tensors are contiguous from byte 0 of the data section and cover it to its last byte:
 *       no overlap (two tensors sharing bytes), no gap and nothing after the last tensor.
 * </ul>
 */
final class HeaderParser {

    /** A validated header: where the data starts, the tensors in header order and the metadata. */
    static final class Header {
        final long dataStart;
        final Map<String, TensorInfo> tensors;
        final Map<String, String> metadata;

        Header(long dataStart, Map<String, TensorInfo> tensors, Map<String, String> metadata) {
            this.dataStart = dataStart;
            this.tensors = ImmutableMap.copyOf(tensors);
            this.metadata = ImmutableMap.copyOf(metadata);
        }
    }

    private HeaderParser() {}

    static Header parse(Path path, FileChannel channel) throws IOException {
        long size = channel.size();
        if (size < 8) {
            throw new SafetensorsFormatException(path + ": truncated safetensors file (" + size
                    + " bytes, fewer than the 8-byte header length)");
        }
        ByteBuffer lengthBuf = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN);
        readFully(channel, lengthBuf, 0, path);
        long headerLength = lengthBuf.flip().getLong();
        if (headerLength <= 0 || headerLength > SafetensorsFile.MAX_HEADER_BYTES) {
            throw new SafetensorsFormatException(path + ": corrupt safetensors header length " + headerLength
                    + " (expected 1.." + SafetensorsFile.MAX_HEADER_BYTES + ")");
        }
        if (8 + headerLength > size) {
            throw new SafetensorsFormatException(path + ": truncated safetensors file: header of " + headerLength
                    + " bytes runs past the end of the file (" + size + " bytes)");
        }
        ByteBuffer headerBuf = ByteBuffer.allocate((int) headerLength);
        readFully(channel, headerBuf, 8, path);
        JsonObject header = json(path, headerBuf.flip());
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
        checkLayout(path, tensors.values(), dataStart, dataSize);
        return new Header(dataStart, tensors, metadata);
    }

    private static JsonObject json(Path path, ByteBuffer bytes) throws SafetensorsFormatException {
        String text;
        try {
            text = StandardCharsets.UTF_8.newDecoder().onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT).decode(bytes).toString();
        } catch (CharacterCodingException e) {
            throw new SafetensorsFormatException(path + ": corrupt safetensors header: not valid UTF-8 (" + e + ")",
                    e);
        }
        try {
            JsonElement parsed = StrictJson.parse(text);
            if (!parsed.isJsonObject()) {
                throw new SafetensorsFormatException(path + ": corrupt safetensors header: not a JSON object");
            }
            return parsed.getAsJsonObject();
        } catch (JsonParseException e) {
            throw new SafetensorsFormatException(path + ": corrupt safetensors header: " + e.getMessage(), e);
        }
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

    /** The reference's {@code validate}: sorted by offsets, each tensor starts where the one before ends. */
    private static void checkLayout(Path path, Iterable<TensorInfo> tensors, long dataStart, long dataSize)
            throws SafetensorsFormatException {
        List<TensorInfo> sorted = new ArrayList<>();
        tensors.forEach(sorted::add);
        sorted.sort(Comparator.comparingLong(TensorInfo::fileOffset).thenComparingLong(TensorInfo::byteLength));
        long covered = 0;
        TensorInfo previous = null;
        for (TensorInfo t : sorted) {
            long begin = t.fileOffset() - dataStart;
            long end = begin + t.byteLength();
            if (begin < covered) {
                long prevBegin = previous.fileOffset() - dataStart;
                throw new SafetensorsFormatException(path + ": tensor '" + t.name() + "' data_offsets [" + begin
                        + ", " + end + "] overlap tensor '" + previous.name() + "' [" + prevBegin + ", "
                        + (prevBegin + previous.byteLength()) + "]: the header is corrupt");
            }
            if (begin > covered) {
                throw new SafetensorsFormatException(path + ": bytes " + covered + ".." + begin
                        + " of the data section belong to no tensor (tensor '" + t.name() + "' starts at " + begin
                        + "): the header is corrupt");
            }
            covered = end;
            previous = t;
        }
        if (covered != dataSize) {
            throw new SafetensorsFormatException(path + ": " + (dataSize - covered) + " bytes after the last tensor"
                    + " (the data section holds " + dataSize + " bytes, the tensors cover " + covered
                    + "): the header is corrupt or the file has trailing data");
        }
    }

    static void readFully(FileChannel channel, ByteBuffer buf, long position, Path path) throws IOException {
        long pos = position;
        while (buf.hasRemaining()) {
            int n = channel.read(buf, pos);
            if (n < 0) {
                throw new SafetensorsFormatException(path + ": unexpected end of file at byte " + pos);
            }
            pos += n;
        }
    }
}
