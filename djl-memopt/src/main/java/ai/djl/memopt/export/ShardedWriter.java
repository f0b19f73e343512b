package ai.djl.memopt.export;

import ai.djl.memopt.safetensors.CrashPoints;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.ndarray.NDArray;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;

/**
 * Writes tensors as {@code model.safetensors}, or, past {@code maxShardBytes}, as Hugging Face shards
 * {@code model-0000i-of-0000n.safetensors} plus {@code model.safetensors.index.json}, each file atomically.
 */
final class ShardedWriter {

    private static final class Entry {
        final String name;
        final NDArray array;
        final long bytes;

        Entry(String name, NDArray array) {
            this.name = name;
            this.array = array;
            this.bytes = array.size() * SafetensorsDType.of(array.getDataType()).byteSize();
        }
    }

    private final List<Entry> entries = new ArrayList<>();

    void add(String name, NDArray array) {
        entries.add(new Entry(name, array));
    }

    /** Writes the files into {@code dir} (fresh: see {@link ArtifactWriter}); returns their names, the index last. */
    List<String> write(Path dir, long maxShardBytes, String format) throws IOException {
        List<List<Entry>> shards = new ArrayList<>();
        List<Entry> current = new ArrayList<>();
        long size = 0;
        long total = 0;
        for (Entry e : entries) {
            if (!current.isEmpty() && size + e.bytes > maxShardBytes) {
                shards.add(current);
                current = new ArrayList<>();
                size = 0;
            }
            current.add(e);
            size += e.bytes;
            total += e.bytes;
        }
        shards.add(current);
        List<String> names = new ArrayList<>();
        if (shards.size() == 1) {
            writeShard(dir.resolve(HfCheckpoint.SINGLE_FILE), shards.get(0), format);
            CrashPoints.reach("export.shard-written");
            names.add(HfCheckpoint.SINGLE_FILE);
            return names;
        }
        JsonObject weightMap = new JsonObject();
        for (int i = 0; i < shards.size(); i++) {
            String name = HfCheckpoint.shardFileName(i, shards.size());
            writeShard(dir.resolve(name), shards.get(i), format);
            CrashPoints.reach("export.shard-written");
            names.add(name);
            for (Entry e : shards.get(i)) {
                weightMap.addProperty(e.name, name);
            }
        }
        HfCheckpoint.writeIndex(dir, weightMap, total);
        names.add(HfCheckpoint.INDEX_FILE);
        return names;
    }

    private static void writeShard(Path file, List<Entry> shard, String format) throws IOException {
        SafetensorsWriter w = new SafetensorsWriter();
        for (Entry e : shard) {
            w.add(e.name, e.array);
        }
        w.putMetadata("format", "pt");
        w.putMetadata("quantization", format);
        w.write(file);
    }
}
