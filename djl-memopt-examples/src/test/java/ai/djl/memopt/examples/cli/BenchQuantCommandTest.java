package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.examples.bench.MarkdownTable;
import ai.djl.memopt.examples.bench.QuantBenchWorker;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.SplittableRandom;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class BenchQuantCommandTest {

    @TempDir Path tmp;
    private Path model;
    private Path heldout;
    private Path calibration;

    @BeforeEach
    void setUp() throws Exception {
        model = CliRun.v3WithTokenizer(Files.createDirectories(tmp.resolve("tiny")));
        heldout = tmp.resolve("heldout.txt");
        Files.writeString(heldout, CliRun.wordLevelText(randomIds(300, 1)));
        calibration = tmp.resolve("calibration.txt");
        Files.writeString(calibration, CliRun.wordLevelText(randomIds(200, 2)));
    }

    private static long[] randomIds(int n, long seed) {
        SplittableRandom r = new SplittableRandom(seed);
        long[] ids = new long[n];
        for (int i = 0; i < n; i++) {
            ids[i] = 6 + r.nextInt(506);
        }
        return ids;
    }

    @Test
    void fp32AndInt8InFreshJvmsGiveConsistentFigures() throws Exception {
        Path md = tmp.resolve("benchmarks.md");
        CliRun r = CliRun.run("bench", "quant", "--model", model.toString(), "--heldout", heldout.toString(),
                "--variant", "int8", "--seq", "64", "--heap", "1g", "--timeout", "300", "--out", md.toString(), "--chart",
                tmp.resolve("img").resolve("q.png").toString());
        assertEquals(0, r.exitCode, r.err);
        String[] lines = r.out.trim().split("\n");
        assertEquals(2, lines.length, r.out);
        JsonObject fp32 = JsonParser.parseString(lines[0]).getAsJsonObject();
        JsonObject int8 = JsonParser.parseString(lines[1]).getAsJsonObject();
        assertEquals("fp32", fp32.get("variant").getAsString());
        assertEquals("int8", int8.get("variant").getAsString());
        long fp32Bytes = fp32.get("weight_bytes").getAsLong();
        assertEquals(fp32Bytes, int8.get("fp32_weight_bytes").getAsLong());
        assertEquals(1.0, fp32.get("weight_ratio").getAsDouble());
        // the fixture's safetensors holds the same FP32 weights (plus a small header)
        long fp32Artifact = fp32.get("artifact_bytes").getAsLong();
        assertTrue(fp32Artifact >= fp32Bytes && fp32Artifact < fp32Bytes + 100_000, fp32.toString());
        long int8Bytes = int8.get("weight_bytes").getAsLong();
        assertTrue(int8Bytes < fp32Bytes, int8.toString());
        // int8 per channel: the quantized layers shrink to about a quarter (plus one FP32 scale per row)
        double layers = int8.get("quantized_layers_ratio").getAsDouble();
        assertTrue(layers > 0.25 && layers < 0.30, int8.toString());
        assertEquals(fp32Bytes - int8.get("quantized_layers_bytes_before").getAsLong()
                + int8.get("quantized_layers_bytes_after").getAsLong(), int8Bytes);
        assertTrue(int8.get("artifact_bytes").getAsLong() < fp32Artifact, int8.toString());
        // same windows; int8 moves the perplexity a little, not a lot
        assertEquals(fp32.get("windows").getAsInt(), int8.get("windows").getAsInt());
        assertEquals(64, int8.get("seq").getAsInt());
        double change = int8.get("perplexity_change").getAsDouble();
        assertEquals(int8.get("perplexity").getAsDouble() / fp32.get("perplexity").getAsDouble() - 1, change, 1e-12);
        assertTrue(Math.abs(change) < 0.02, int8.toString());
        assertEquals(0.0, fp32.get("perplexity_change").getAsDouble());
        byte[] png = Files.readAllBytes(tmp.resolve("img").resolve("q.png"));
        assertTrue(png.length > 1000 && png[1] == 'P' && png[2] == 'N' && png[3] == 'G', "not a PNG");
        List<List<String>> rows = MarkdownTable.read(md, BenchQuantCommand.TABLE);
        assertEquals(2, rows.size(), rows.toString());
        assertEquals(List.of("tiny", "fp32", "fp32", "fp32", "-", "64"), rows.get(0).subList(0, 6));
        assertEquals(List.of("tiny", "int8", "fp32", "fp32", "-", "64"), rows.get(1).subList(0, 6));
    }

    @Test
    void int4WithAwqInProcess() throws Exception {
        JsonObject rtn = QuantBenchWorker.run(model, "int4", heldout, null, 128, 64, false, tmp.resolve("w"), 2, 16);
        JsonObject awq = QuantBenchWorker.run(model, "int4-awq", heldout, calibration, 128, 64, false,
                tmp.resolve("w"), 2, 16);
        for (JsonObject o : List.of(rtn, awq)) {
            // the fixture's widths (16..128) make group 128 fall back to 64 or 32: 4 bits plus an FP32 scale and a
            // UINT8 zero point per group of 32 or more weights (bounded here by 8 bytes per group)
            double layers = o.get("quantized_layers_ratio").getAsDouble();
            assertTrue(layers > 0.125 && layers <= 0.125 + 8.0 / 32 / 4, o.toString());
            assertTrue(o.get("weight_bytes").getAsLong() < o.get("fp32_weight_bytes").getAsLong(), o.toString());
            assertTrue(Files.isRegularFile(Path.of(o.get("artifact").getAsString()).resolve("model.safetensors")));
            assertTrue(Double.isFinite(o.get("perplexity").getAsDouble()), o.toString());
        }
        // AWQ keeps its per-input-channel scales next to the packed weights: a little more than RTN
        long rtnBytes = rtn.get("weight_bytes").getAsLong();
        long awqBytes = awq.get("weight_bytes").getAsLong();
        assertTrue(awqBytes > rtnBytes && awqBytes < 1.05 * rtnBytes, rtnBytes + " vs " + awqBytes);
    }

    /**
     * Quantized embedding tables in the benchmark: the whole-model bytes drop by exactly the table's float bytes minus
     * its quantized bytes (int8: one byte per value and an FP32 scale per row; int4 g64: half a byte per value and
     * 5 bytes per group of the fixture's 64-wide rows).
     */
    @Test
    void includeEmbeddingsInProcess() throws Exception {
        JsonObject plain = QuantBenchWorker.run(model, "int4", heldout, null, 128, 64, true, null, tmp.resolve("w"), 2,
                16);
        JsonObject e8 = QuantBenchWorker.run(model, "int4", heldout, null, 128, 64, true, "int8", tmp.resolve("w"), 2,
                16);
        JsonObject e4 = QuantBenchWorker.run(model, "int4-gptq", heldout, calibration, 128, 64, true, "same",
                tmp.resolve("w"), 2, 16);
        long vocab = 512;
        long hidden = 64;
        long table = vocab * hidden * 4;
        assertEquals("fp32", plain.get("embeddings").getAsString());
        assertEquals("int8", e8.get("embeddings").getAsString());
        assertEquals("int4", e4.get("embeddings").getAsString());
        long plainBytes = plain.get("weight_bytes").getAsLong();
        assertEquals(plainBytes - table + vocab * hidden + vocab * 4, e8.get("weight_bytes").getAsLong());
        assertEquals(plainBytes - table + vocab * hidden / 2 + vocab * 5, e4.get("weight_bytes").getAsLong());
        assertTrue(Double.isFinite(e4.get("perplexity").getAsDouble()), e4.toString());
        assertTrue(QuantizedArtifactCheck.hasTable(Path.of(e8.get("artifact").getAsString())));
    }

    /** Reads the embedding entry of an artifact. */
    static final class QuantizedArtifactCheck {
        static boolean hasTable(Path dir) throws java.io.IOException {
            return ai.djl.memopt.export.QuantizedArtifact.verify(dir).embeddings().containsKey("model.embed_tokens");
        }
    }

    @Test
    void badOptionsAreRejectedBeforeAnyJvmStarts() {
        CliRun r = CliRun.run("bench", "quant", "--model", model.toString(), "--heldout", heldout.toString(),
                "--variant", "int3");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("unknown --variant 'int3'"), r.err);
        r = CliRun.run("bench", "quant", "--model", model.toString(), "--heldout", heldout.toString(), "--variant",
                "int4-awq");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("int4-awq needs --calibration"), r.err);
        r = CliRun.run("bench", "quant", "--model", tmp.resolve("nope").toString(), "--heldout", heldout.toString());
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("not a directory"), r.err);
        r = CliRun.run("bench", "quant", "--model", model.toString(), "--held-out", tmp.resolve("x.txt").toString());
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--held-out") && r.err.contains("no such file"), r.err);
        r = CliRun.run("bench", "quant", "--model", model.toString(), "--heldout", heldout.toString(),
                "--group-size", "100");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--group-size must be 32, 64 or 128, got 100"), r.err);
        r = CliRun.run("bench", "quant", "--model", model.toString(), "--heldout", heldout.toString(),
                "--embedding-scheme", "int8");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--embedding-scheme needs --include-embeddings"), r.err);
    }
}
