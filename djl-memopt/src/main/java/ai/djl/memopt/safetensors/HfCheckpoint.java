package ai.djl.memopt.safetensors;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import com.google.common.collect.ImmutableList;
import com.google.common.collect.ImmutableMap;
import com.google.common.collect.ImmutableSortedSet;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.SortedSet;

/**
 * The weights of a Hugging Face model directory: {@code model.safetensors}, or the shards listed in
 * {@code model.safetensors.index.json}, read tensor by tensor through memory mappings.
 *
 * <pre>{@code
 * try (HfCheckpoint ckpt = HfCheckpoint.open(Path.of("DeepSeek-V2-Lite"))) {
 *     for (String name : ckpt.names()) { ... ckpt.load(manager, name, DataType.FLOAT16) ... }
 * }
 * }</pre>
 */
public final class HfCheckpoint implements AutoCloseable {

    public static final String SINGLE_FILE = "model.safetensors";
    public static final String INDEX_FILE = "model.safetensors.index.json";

    /** The name of shard {@code index} (0-based) of {@code count}, as Hugging Face names them. */
    public static String shardFileName(int index, int count) {
        return String.format(Locale.ROOT, "model-%05d-of-%05d.safetensors", index + 1, count);
    }

    /**
     * Writes {@code model.safetensors.index.json} into {@code directory} atomically.
     *
     * @param weightMap tensor name to shard file name
     * @param totalSize the bytes of all tensors' data ({@code metadata.total_size})
     */
    public static void writeIndex(Path directory, JsonObject weightMap, long totalSize) throws IOException {
        JsonObject index = new JsonObject();
        JsonObject meta = new JsonObject();
        meta.addProperty("total_size", totalSize);
        index.add("metadata", meta);
        index.add("weight_map", weightMap);
        AtomicFiles.writeString(directory.resolve(INDEX_FILE),
                new GsonBuilder().setPrettyPrinting().create().toJson(index) + "\n");
    }

    private final Path directory;
    private final List<SafetensorsFile> files;
    private final Map<String, SafetensorsFile> byTensor;

    private HfCheckpoint(Path directory, List<SafetensorsFile> files, Map<String, SafetensorsFile> byTensor) {
        this.directory = directory;
        this.files = files;
        this.byTensor = byTensor;
    }

    /**
     * Opens the checkpoint of a model directory and validates every file's header (and the index, if sharded).
     *
     * @throws SafetensorsFormatException naming the file and tensor for a missing shard, a shard path outside the
     *     directory, a tensor the index lists that its shard lacks, a tensor in two shards, or any corrupt or
     *     truncated file
     * @throws IOException if a file cannot be read or is not a regular file
     */
    public static HfCheckpoint open(Path directory) throws IOException {
        if (!Files.isDirectory(directory)) {
            throw new SafetensorsFormatException(directory + ": not a model directory");
        }
        Path index = directory.resolve(INDEX_FILE);
        Path single = directory.resolve(SINGLE_FILE);
        Map<String, SafetensorsFile> byFileName = new LinkedHashMap<>();
        Map<String, SafetensorsFile> byTensor = new LinkedHashMap<>();
        try {
            if (Files.exists(index)) {
                Map<String, String> weightMap = readIndex(index);
                for (Map.Entry<String, String> e : weightMap.entrySet()) {
                    SafetensorsFile file = byFileName.get(e.getValue());
                    if (file == null) {
                        Path shard = directory.resolve(e.getValue()).normalize();
                        if (Path.of(e.getValue()).isAbsolute() || !shard.startsWith(directory.normalize())) {
                            throw new SafetensorsFormatException(index + ": shard path '" + e.getValue()
                                    + "' of tensor '" + e.getKey() + "' refused: it is absolute or leaves the model"
                                    + " directory through '..'; shards must be files inside " + directory);
                        }
                        if (!Files.exists(shard)) {
                            throw new SafetensorsFormatException(index + ": shard '" + e.getValue()
                                    + "' of tensor '" + e.getKey() + "' does not exist in " + directory);
                        }
                        file = SafetensorsFile.open(shard);
                        byFileName.put(e.getValue(), file);
                    }
                    if (!file.contains(e.getKey())) {
                        throw new SafetensorsFormatException(index + " lists tensor '" + e.getKey() + "' in "
                                + file.path() + ", which does not contain it");
                    }
                    byTensor.put(e.getKey(), file);
                }
            } else if (Files.exists(single)) {
                SafetensorsFile file = SafetensorsFile.open(single);
                byFileName.put(SINGLE_FILE, file);
                for (String name : file.names()) {
                    byTensor.put(name, file);
                }
            } else {
                throw new SafetensorsFormatException(directory + ": no " + SINGLE_FILE + " or " + INDEX_FILE);
            }
        } catch (IOException | RuntimeException e) {
            for (SafetensorsFile f : byFileName.values()) {
                try {
                    f.close();
                } catch (IOException suppressed) {
                    e.addSuppressed(suppressed);
                }
            }
            throw e;
        }
        return new HfCheckpoint(directory, ImmutableList.copyOf(byFileName.values()), ImmutableMap.copyOf(byTensor));
    }

    private static Map<String, String> readIndex(Path index) throws IOException {
        RegularFiles.require(index, "shard index");
        try {
            JsonElement root = StrictJson.parse(Files.readString(index, StandardCharsets.UTF_8));
            if (!root.isJsonObject() || !root.getAsJsonObject().has("weight_map")
                    || !root.getAsJsonObject().get("weight_map").isJsonObject()) {
                throw new SafetensorsFormatException(index + ": no 'weight_map' object");
            }
            Map<String, String> out = new LinkedHashMap<>();
            for (Map.Entry<String, JsonElement> e : root.getAsJsonObject().getAsJsonObject("weight_map").entrySet()) {
                if (!e.getValue().isJsonPrimitive()) {
                    throw new SafetensorsFormatException(index + ": weight_map entry '" + e.getKey()
                            + "' is not a file name");
                }
                out.put(e.getKey(), e.getValue().getAsString());
            }
            return out;
        } catch (JsonParseException e) {
            throw new SafetensorsFormatException(index + ": not valid JSON: " + e.getMessage(), e);
        }
    }

    /**
     * The {@code quantization} entry of the files' {@code __metadata__} (a quantized artifact's weights carry
     * {@code djl-memopt-quantized}), if any file has one.
     */
    public java.util.Optional<String> quantizationMetadata() {
        return files.stream().map(f -> f.metadata().get("quantization")).filter(java.util.Objects::nonNull)
                .findFirst();
    }

    public Path directory() {
        return directory;
    }

    /** The safetensors files, in index order. */
    public List<Path> files() {
        return files.stream().map(SafetensorsFile::path).collect(ImmutableList.toImmutableList());
    }

    /** Every tensor name, sorted. */
    public SortedSet<String> names() {
        return ImmutableSortedSet.copyOf(byTensor.keySet());
    }

    public boolean contains(String name) {
        return byTensor.containsKey(name);
    }

    /** The file holding a tensor. */
    public SafetensorsFile fileOf(String name) {
        SafetensorsFile f = byTensor.get(name);
        if (f == null) {
            throw new IllegalArgumentException(directory + ": checkpoint has no tensor '" + name + "'");
        }
        return f;
    }

    public TensorInfo info(String name) {
        return fileOf(name).info(name);
    }

    public ByteBuffer bytes(String name) throws IOException {
        return fileOf(name).bytes(name);
    }

    /** {@link SafetensorsFile#checkFinite}. */
    public void checkFinite(String name) throws IOException {
        fileOf(name).checkFinite(name);
    }

    public float[] readFloats(String name) throws IOException {
        return fileOf(name).readFloats(name);
    }

    public NDArray load(NDManager manager, String name) throws IOException {
        return fileOf(name).load(manager, name);
    }

    public NDArray load(NDManager manager, String name, DataType target) throws IOException {
        return fileOf(name).load(manager, name, target);
    }

    @Override
    public void close() throws IOException {
        IOException first = null;
        for (SafetensorsFile f : files) {
            try {
                f.close();
            } catch (IOException e) {
                if (first == null) {
                    first = e;
                } else {
                    first.addSuppressed(e);
                }
            }
        }
        if (first != null) {
            throw first;
        }
    }
}
