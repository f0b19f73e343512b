package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.examples.bench.MarkdownTable;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class BenchGenerateCommandTest {

    @TempDir Path tmp;

    @Test
    void oneBatchInAFreshJvmGivesConsistentFigures() throws Exception {
        Path md = tmp.resolve("benchmarks.md");
        Files.writeString(md, "# Benchmarks\n\n## Training memory\n\nkept\n");
        CliRun r = CliRun.run("bench", "generate", "--preset", "bench-tiny", "--prompt-tokens", "6", "--new-tokens",
                "3", "--batch", "2", "--prefill-chunk", "4", "--heap", "1g", "--timeout", "300", "--out", md.toString(),
                "--expert-dispatch", "gathered");
        assertEquals(0, r.exitCode, r.err);
        assertEquals(null, System.getProperty(ai.djl.memopt.inference.ExpertDispatch.PROPERTY),
                "the command restores the property it set for its workers");
        String[] lines = r.out.trim().split("\n");
        assertEquals(1, lines.length, r.out);
        JsonObject o = JsonParser.parseString(lines[0]).getAsJsonObject();
        DeepSeekConfig c = DeepSeekConfig.preset("bench-tiny");
        assertEquals("bench-tiny", o.get("preset").getAsString());
        assertEquals(2, o.get("batch").getAsInt());
        assertEquals(6, o.get("prompt_tokens").getAsInt());
        assertEquals(3, o.get("new_tokens").getAsInt());
        assertEquals("cpu", o.get("device").getAsString());
        assertEquals("gathered", o.get("expert_dispatch").getAsString(), "the worker JVM followed --expert-dispatch");
        assertEquals("torchscript", o.get("decode_path").getAsString(), "bench-tiny's layers are plain: scripted");
        assertEquals(ai.djl.memopt.inference.DecodePath.DEFAULT_SCRIPT_MAX_BATCH, o.get("script_max_batch").getAsInt());
        assertEquals(null, System.getProperty(ai.djl.memopt.inference.DecodePath.PROPERTY));
        assertEquals(4, o.get("prefill_chunk").getAsInt());
        // FP32: (kv_lora_rank + qk_rope_head_dim) x layers x 4 bytes, and the per-head cache for comparison
        long mla = (long) (c.kvLoraRank() + c.qkRopeHeadDim()) * c.numHiddenLayers() * 4;
        long hf = (long) c.numAttentionHeads() * (c.qkNopeHeadDim() + c.qkRopeHeadDim() + c.vHeadDim())
                * c.numHiddenLayers() * 4;
        assertEquals(mla, o.get("cache_bytes_per_token").getAsLong());
        assertEquals(hf, o.get("hf_cache_bytes_per_token").getAsLong());
        // the session's buffers hold B x (P + N) tokens
        assertEquals(mla * 2 * (6 + 3), o.get("cache_bytes").getAsLong());
        double decode = o.get("decode_seconds").getAsDouble();
        assertTrue(decode > 0 && o.get("prefill_seconds").getAsDouble() > 0, o.toString());
        assertEquals(2 * 2 / decode, o.get("tokens_per_second").getAsDouble(), 1e-9);
        long peak = o.get("peak_memory_bytes").getAsLong();
        assertTrue(peak >= o.get("idle_memory_bytes").getAsLong() && peak > 4 * c.parameterCount(), o.toString());
        String text = Files.readString(md, StandardCharsets.UTF_8);
        assertTrue(text.startsWith("# Benchmarks\n\n## Training memory\n\nkept\n"
                + MarkdownTable.begin(BenchGenerateCommand.TABLE)), text);
        List<List<String>> rows = MarkdownTable.read(md, BenchGenerateCommand.TABLE);
        assertEquals(1, rows.size(), text);
        assertEquals(List.of("bench-tiny", "2", "6", "3", "cpu torchscript", "4"), rows.get(0).subList(0, 6));
        assertEquals(Long.toString(mla), rows.get(0).get(8));
        assertEquals("4.0x", rows.get(0).get(10));
    }

    @Test
    void badOptionsAreRejectedBeforeAnyJvmStarts() {
        CliRun r = CliRun.run("bench", "generate", "--preset", "huge");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("unknown preset"), r.err);
        r = CliRun.run("bench", "generate", "--batch", "1,0");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--batch must be >= 1, got 0"), r.err);
        r = CliRun.run("bench", "generate", "--max-new-tokens", "1");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--max-new-tokens >= 2"), r.err);
        r = CliRun.run("bench", "generate", "--prompt-tokens", "2000", "--max-new-tokens", "100");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("max_position_embeddings 2048"), r.err);
        r = CliRun.run("bench", "generate", "--dtype", "bf16");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--dtype must be fp32 (float32) or fp16 (float16), got 'bf16'"), r.err);
        r = CliRun.run("bench", "generate", "--expert-dispatch", "fastest");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--expert-dispatch must be auto, gathered or sorted, got 'fastest'"), r.err);
        r = CliRun.run("bench", "generate", "--decode-path", "python");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--decode-path must be auto, torchscript or java, got 'python'"), r.err);
        r = CliRun.run("bench", "generate", "--prefill-chunk", "0");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--prefill-chunk must be >= 1, got 0"), r.err);
        r = CliRun.run("bench", "generate", "--device", "tpu");
        assertNotEquals(0, r.exitCode);
        assertTrue(r.err.contains("--device must be cpu or gpu"), r.err);
    }
}
