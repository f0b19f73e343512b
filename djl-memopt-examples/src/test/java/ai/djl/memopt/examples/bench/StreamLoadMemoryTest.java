package ai.djl.memopt.examples.bench;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.memopt.safetensors.SafetensorsWriter;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Streaming int4 loading holds about the quantized model, never the float one. A synthetic random F32 DeepSeek-V3
 * checkpoint (7 layers, 158 MB, written tensor by tensor so this test never holds it) is loaded as int4 g128 in a
 * fresh JVM by {@link ai.djl.memopt.quantize.StreamingQuantizedLoader} and, for contrast, by load-FP32-then-quantize;
 * each child first does the same load of a 2-layer checkpoint of the same shapes (libtorch's kernels, code pages and
 * allocator arenas exist before the baseline), then resets its peak and measures {@code VmHWM - VmRSS before}.
 *
 * <p>The child runs with a small young generation ({@code -Xmn8m}: Java garbage would otherwise show up as resident
 * eden pages) and {@code MALLOC_MMAP_THRESHOLD_=131072}: glibc raises its mmap threshold to the size of every freed
 * large block, so without it each layer's multi-MB temporaries land in the heap arena between the codes that stay and
 * are never returned (measured with default glibc on a 10-layer, 227 MB sibling: 170 MB growth for a 38 MB int4 model).
 * Measured with it (2 cores, JDK 17, three runs): checkpoint 157.9 MB, largest tensor 4.0 MB, int4 model 28.4 MB; peak
 * growth streamed 29.9 / 33.9 / 41.2 MB, load-then-quantize 305 MB (float model, mapped pages and direct buffers).
 */
class StreamLoadMemoryTest {

    /** Allowed on top of model + largest tensor: quantization temporaries, allocator arenas, JIT, Java heap. */
    static final long SLACK = 32L << 20;

    @TempDir Path tmp;

    static DeepSeekConfig config() {
        return DeepSeekConfig.builder(DeepSeekConfig.DEEPSEEK_V3)
                .vocabSize(2048).hiddenSize(512).intermediateSize(1536).moeIntermediateSize(384)
                .numHiddenLayers(7).numAttentionHeads(8).qLoraRank(192).kvLoraRank(128)
                .qkNopeHeadDim(64).qkRopeHeadDim(32).vHeadDim(64).nRoutedExperts(8).nSharedExperts(1)
                .numExpertsPerTok(2).nGroup(2).topkGroup(1).routedScalingFactor(2.5).normTopkProb(true)
                .firstKDenseReplace(1).maxPositionEmbeddings(256).tieWordEmbeddings(false).build();
    }

    /** Writes a random F32 checkpoint of {@code config}; returns {@code [total bytes, largest tensor bytes]}. */
    static long[] writeCheckpoint(DeepSeekConfig config, Path dir) throws IOException {
        Map<String, Shape> shapes = new LinkedHashMap<>();
        try (NDManager m = NDManager.newBaseManager()) {
            // 1-element placeholders: only the parameter shapes are wanted
            DeepSeekForCausalLM lm = new DeepSeekForCausalLM(config);
            lm.initializeWith(m, DataType.FLOAT32, name -> (mm, shape, type) -> {
                shapes.put(name, shape);
                return mm.zeros(new Shape(1), type);
            });
        }
        SafetensorsWriter w = new SafetensorsWriter();
        long total = 0;
        long largest = 0;
        for (Map.Entry<String, Shape> e : shapes.entrySet()) {
            String name = e.getKey();
            long n = e.getValue().size();
            total += 4 * n;
            largest = Math.max(largest, 4 * n);
            // each tensor's bytes exist only while the writer copies them out
            w.add(name, SafetensorsDType.F32, e.getValue().getShape(), () -> {
                ByteBuffer b = ByteBuffer.allocate(Math.toIntExact(4 * n)).order(ByteOrder.LITTLE_ENDIAN);
                SplittableRandom r = new SplittableRandom(name.hashCode());
                boolean norm = name.endsWith("norm.weight");
                boolean bias = name.endsWith("e_score_correction_bias");
                for (long i = 0; i < n; i++) {
                    b.putFloat(norm ? 1f : bias ? 0f : (float) (0.04 * (r.nextDouble() - 0.5)));
                }
                return b.flip();
            });
        }
        Files.createDirectories(dir);
        w.write(dir.resolve("model.safetensors"));
        Files.writeString(dir.resolve("config.json"), config.toJson(), StandardCharsets.UTF_8);
        return new long[] {total, largest};
    }

    private static JsonObject run(Path dir, Path warmup, String mode) throws IOException {
        List<String> lines = FreshJvm.run(
                List.of("-Xmx256m", "-Xmn8m", "-XX:+UseSerialGC", "-XX:MaxDirectMemorySize=1g"),
                Map.of("MALLOC_MMAP_THRESHOLD_", "131072"), 180, StreamLoadWorker.class,
                List.of(dir.toString(), mode, "128", warmup.toString()));
        String last = lines.get(lines.size() - 1);
        return JsonParser.parseString(last).getAsJsonObject();
    }

    @Test
    void streamedInt4PeakIsNearTheQuantizedSize() throws IOException {
        Path dir = tmp.resolve("synthetic");
        long[] sizes = writeCheckpoint(config(), dir);
        Path warmup = tmp.resolve("warmup");
        writeCheckpoint(config().toBuilder().numHiddenLayers(2).build(), warmup);
        long checkpoint = sizes[0];
        long largest = sizes[1];

        JsonObject stream = run(dir, warmup, "stream");
        JsonObject eager = run(dir, warmup, "eager");
        long streamGrowth = stream.get("peak").getAsLong() - stream.get("rss_before").getAsLong();
        long eagerGrowth = eager.get("peak").getAsLong() - eager.get("rss_before").getAsLong();
        long model = stream.get("model_bytes").getAsLong();
        System.out.printf("checkpoint %.1f MB (largest tensor %.1f MB), int4 model %.1f MB; peak RSS growth:"
                        + " streamed %.1f MB, load-then-quantize %.1f MB (peak reset: %s/%s)%n",
                mb(checkpoint), mb(largest), mb(model), mb(streamGrowth), mb(eagerGrowth),
                stream.get("peak_reset"), eager.get("peak_reset"));

        // the two paths build the same model
        assertEquals(model, eager.get("model_bytes").getAsLong());
        assertEquals(stream.get("quantized_layers").getAsInt(), eager.get("quantized_layers").getAsInt());
        assertEquals(eager.get("logits_sum").getAsDouble(), stream.get("logits_sum").getAsDouble(), 0.0);
        assertTrue(checkpoint > 4 * SLACK, "the checkpoint must dwarf the slack");
        assertTrue(streamGrowth < model + largest + SLACK,
                String.format("streamed peak growth %d > model %d + largest tensor %d + slack %d", streamGrowth,
                        model, largest, SLACK));
        assertTrue(streamGrowth < checkpoint / 2, "streamed peak growth " + streamGrowth + " vs " + checkpoint);
        // the measurement sees a float model when one is held
        assertTrue(eagerGrowth > checkpoint * 8 / 10, "load-then-quantize growth " + eagerGrowth);
    }

    private static double mb(long bytes) {
        return bytes / 1048576.0;
    }
}
