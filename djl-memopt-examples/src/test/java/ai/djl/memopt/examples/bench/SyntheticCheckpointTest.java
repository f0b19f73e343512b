package ai.djl.memopt.examples.bench;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.SafetensorsDType;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class SyntheticCheckpointTest {

    @TempDir Path tmp;

    @Test
    void inverseNormalMatchesKnownQuantiles() {
        assertEquals(0.0, SyntheticCheckpoint.inverseNormal(0.5), 1e-9);
        assertEquals(1.959963985, SyntheticCheckpoint.inverseNormal(0.975), 1e-6);
        assertEquals(-2.326347874, SyntheticCheckpoint.inverseNormal(0.01), 1e-6);
        assertEquals(3.090232306, SyntheticCheckpoint.inverseNormal(0.999), 1e-6);
    }

    @Test
    void writesAShardedHfCheckpointTheLoaderAccepts() throws Exception {
        DeepSeekConfig config = DeepSeekConfig.preset("bench-tiny");
        Path dir = tmp.resolve("tiny");
        // shards of at most 4 MB: the 2 MB embedding and lm_head force several
        SyntheticCheckpoint.Summary s = SyntheticCheckpoint.write(config, dir, 5, 4L << 20, null);
        assertTrue(s.shards() >= 3, s.shards() + " shards");
        try (Stream<Path> files = Files.list(dir)) {
            List<String> names = files.map(p -> p.getFileName().toString()).sorted().toList();
            assertTrue(names.contains("config.json") && names.contains(HfCheckpoint.INDEX_FILE), names.toString());
            assertTrue(names.contains(String.format("model-00001-of-%05d.safetensors", s.shards())), names.toString());
            assertFalse(names.stream().anyMatch(n -> n.endsWith(".tmp")), names.toString());
        }
        try (NDManager m = NDManager.newBaseManager(); HfCheckpoint ckpt = HfCheckpoint.open(dir)) {
            long params = 0;
            for (String name : ckpt.names()) {
                assertEquals(SafetensorsDType.BF16, ckpt.info(name).dtype(), name);
                params += ckpt.info(name).numel();
            }
            assertEquals(s.parameters(), params);
            assertEquals(2 * params, s.bytes());
            // the model's own loader checks every name and shape against the config
            DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, m, DataType.FLOAT32);
            assertEquals(BlockTrees.parameters(lm).keySet(), ckpt.names());
            for (float v : ckpt.readFloats("model.layers.1.post_attention_layernorm.weight")) {
                assertEquals(1f, v);
            }
            float[] w = ckpt.readFloats("model.layers.1.mlp.experts.3.down_proj.weight");
            double sum = 0;
            double sq = 0;
            int beyond3 = 0;
            for (float v : w) {
                sum += v;
                sq += v * v;
                beyond3 += Math.abs(v) > 3 * 0.02 ? 1 : 0;
            }
            double mean = sum / w.length;
            double std = Math.sqrt(sq / w.length - mean * mean);
            assertEquals(0, mean, 0.001, "mean");
            assertEquals(0.02, std, 0.0005, "std");
            // a normal puts 0.27% beyond 3 sigma
            assertEquals(0.0027, beyond3 / (double) w.length, 0.0015, "tail mass");
        }
        // seeded: the same seed gives the same bytes, another seed other bytes
        Path again = tmp.resolve("again");
        SyntheticCheckpoint.write(config, again, 5, 64L << 20, null);
        Path other = tmp.resolve("other");
        SyntheticCheckpoint.write(config, other, 6, 64L << 20, null);
        try (HfCheckpoint a = HfCheckpoint.open(dir); HfCheckpoint b = HfCheckpoint.open(again);
                HfCheckpoint c = HfCheckpoint.open(other)) {
            String name = "model.layers.0.self_attn.q_b_proj.weight";
            assertArrayEquals(a.readFloats(name), b.readFloats(name), "same seed, other sharding");
            assertFalse(java.util.Arrays.equals(a.readFloats(name), c.readFloats(name)), "another seed");
        }
    }
}
