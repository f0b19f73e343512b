package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.gguf.GgmlQuants;
import ai.djl.memopt.gguf.GgmlType;
import ai.djl.memopt.gguf.GgufQuantizer;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.training.ParameterStore;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.sun.jna.Function;
import com.sun.jna.Memory;
import com.sun.jna.NativeLibrary;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.Random;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * {@code memopt gguf export} checked by the real llama.cpp ({@link LlamaCpp}): greedy tokens against transformers',
 * per-token log-probabilities of Q8_0/Q4_0 exports against our own quantized model, ggml's own quantizers against
 * ours byte for byte, and {@code perplexity --model FILE.gguf} against the model the file came from.
 */
class GgufLlamaCppTest {

    @TempDir
    Path tmp;

    @Test
    void llamaCppGreedyOnF32ExportsEqualsTransformers() throws Exception {
        JsonObject request = new JsonObject();
        JsonArray jobs = new JsonArray();
        long[][] expected = new long[2][];
        String[] fixtures = {"tiny-deepseek-v3", "tiny-deepseek-v2"};
        for (int i = 0; i < 2; i++) {
            Path dir = CliRun.FIXTURES.resolve(fixtures[i]);
            Path file = tmp.resolve(fixtures[i] + "-f32.gguf");
            CliRun r = CliRun.run("gguf", "export", "--model", dir.toString(), "--type", "f32", "--out",
                    file.toString());
            assertEquals(0, r.exitCode, r.err);
            long[] prompt;
            long[] output;
            try (NDManager m = NDManager.newBaseManager();
                    SafetensorsFile ref = SafetensorsFile.open(dir.resolve("reference.safetensors"))) {
                prompt = ref.load(m, "greedy_prompt").toLongArray();
                output = ref.load(m, "greedy_output").toLongArray();
            }
            expected[i] = Arrays.copyOfRange(output, prompt.length, output.length);
            JsonObject job = LlamaCpp.job(file);
            JsonObject greedy = new JsonObject();
            greedy.add("prompt", LlamaCpp.ids(prompt));
            greedy.addProperty("newTokens", expected[i].length);
            job.add("greedy", greedy);
            jobs.add(job);
        }
        request.add("jobs", jobs);
        JsonArray results = LlamaCpp.check(request);
        for (int i = 0; i < 2; i++) {
            long[] got = LlamaCpp.longs(results.get(i).getAsJsonObject().getAsJsonArray("greedy"));
            System.out.println(fixtures[i] + " llama.cpp greedy " + Arrays.toString(got));
            assertArrayEquals(expected[i], got, fixtures[i] + ": llama.cpp's greedy tokens differ from transformers'");
        }
    }

    @Test
    void llamaCppLogProbsOnQuantizedExportsAgreeWithOurQuantizedModel() throws Exception {
        Path dir = CliRun.FIXTURES.resolve("tiny-deepseek-v3");
        long[][] windows = windows(new Random(7), 4, 48, 512);
        JsonArray jobs = new JsonArray();
        GgmlType[] types = {GgmlType.Q8_0, GgmlType.Q4_0};
        for (GgmlType t : types) {
            Path file = tmp.resolve("v3-" + t + ".gguf");
            CliRun r = CliRun.run("gguf", "export", "--model", dir.toString(), "--type", t.name().toLowerCase(),
                    "--out", file.toString());
            assertEquals(0, r.exitCode, r.err);
            JsonObject job = LlamaCpp.job(file);
            JsonArray w = new JsonArray();
            for (long[] ids : windows) {
                w.add(LlamaCpp.ids(ids));
            }
            job.add("logprobs", w);
            jobs.add(job);
        }
        JsonObject request = new JsonObject();
        request.add("jobs", jobs);
        JsonArray results = LlamaCpp.check(request);
        for (int k = 0; k < types.length; k++) {
            JsonArray lp = results.get(k).getAsJsonObject().getAsJsonArray("logprobs");
            double oursNll = 0;
            double theirsNll = 0;
            double maxTokenDiff = 0;
            int n = 0;
            try (NDManager m = NDManager.newBaseManager()) {
                DeepSeekForCausalLM ours = DeepSeekLoader.load(dir, m, DataType.FLOAT32);
                GgufQuantizer.quantize(ours, types[k]); // our quantized model: the same blocks, in our layers
                for (int w = 0; w < windows.length; w++) {
                    float[] mine = logProbs(ours, m, windows[w]);
                    JsonArray theirs = lp.get(w).getAsJsonArray();
                    for (int i = 0; i < mine.length; i++) {
                        double t = theirs.get(i).getAsDouble();
                        oursNll -= mine[i];
                        theirsNll -= t;
                        maxTokenDiff = Math.max(maxTokenDiff, Math.abs(mine[i] - t));
                        n++;
                    }
                }
            }
            double rel = Math.abs(oursNll - theirsNll) / oursNll;
            System.out.printf("%s: held-out loss ours %.6f, llama.cpp %.6f, relative difference %.4f%%, max per-token "
                    + "log-prob difference %.4f%n", types[k], oursNll / n, theirsNll / n, 100 * rel, maxTokenDiff);
            assertTrue(rel < (types[k] == GgmlType.Q8_0 ? 0.01 : 0.05), types[k] + ": loss differs by " + rel);
        }
    }

    @Test
    void perplexityOfGgufExportsReproducesTheSourceModel() throws Exception {
        Path dir = CliRun.FIXTURES.resolve("tiny-deepseek-v3");
        long[] ids = windows(new Random(3), 1, 40, 512)[0];
        String csv = Arrays.toString(ids).replaceAll("[\\[\\] ]", "");
        double source = loss(CliRun.run("perplexity", "--model", dir.toString(), "--token-ids", csv));
        for (GgmlType t : new GgmlType[] {GgmlType.F32, GgmlType.Q8_0, GgmlType.Q4_0}) {
            Path file = tmp.resolve("ppl-" + t + ".gguf");
            assertEquals(0, CliRun.run("gguf", "export", "--model", dir.toString(), "--type", t.name().toLowerCase(),
                    "--out", file.toString()).exitCode);
            double gguf = loss(CliRun.run("perplexity", "--model", file.toString(), "--token-ids", csv));
            if (t == GgmlType.F32) {
                assertEquals(source, gguf, 1e-5, "F32 export's loss");
            } else {
                double ours;
                try (NDManager m = NDManager.newBaseManager()) {
                    DeepSeekForCausalLM q = DeepSeekLoader.load(dir, m, DataType.FLOAT32);
                    GgufQuantizer.quantize(q, t);
                    ours = loss(PerplexityCommand.evaluate(PerplexityCommand.scorerOf(q, () -> { }), ids, 256));
                }
                System.out.printf("%s: perplexity loss of the GGUF %.8f, of our quantized model %.8f%n", t, gguf, ours);
                assertEquals(ours, gguf, 0.0, t + ": the natively loaded GGUF must equal our quantized model");
                assertTrue(Math.abs(gguf - source) > 0, "quantization changed nothing?");
            }
        }
    }

    @Test
    void ggmlsOwnQuantizersWriteTheSameBytes() {
        NativeLibrary ggml = NativeLibrary.getInstance(LlamaCpp.ggmlBase().toString());
        Random rnd = new Random(11);
        int n = 32 * 64;
        float[] x = new float[n];
        for (int i = 0; i < n; i++) {
            x[i] = (float) rnd.nextGaussian() * (i < 32 ? 0 : 1e-2f * (1 + i % 7));
        }
        for (int i = 64; i < 96; i++) {
            x[i] = (i - 80) * 0.25f; // exact halves: roundf's ties
        }
        x[100] = -3f; // a block whose largest magnitude is negative (Q4_0's sign of d)
        for (GgmlType t : new GgmlType[] {GgmlType.Q8_0, GgmlType.Q4_0}) {
            String fn = t == GgmlType.Q8_0 ? "quantize_row_q8_0_ref" : "quantize_row_q4_0_ref";
            Memory src = new Memory(4L * n);
            src.write(0, x, 0, n);
            int bytes = (int) t.rowBytes(n);
            Memory dst = new Memory(bytes);
            Function f = ggml.getFunction(fn);
            f.invoke(Void.class, new Object[] {src, dst, (long) n});
            byte[] theirs = dst.getByteArray(0, bytes);
            assertArrayEquals(theirs, GgmlQuants.quantize(t, x), t + ": our blocks differ from ggml's " + fn);
            Memory back = new Memory(4L * n);
            ggml.getFunction(t == GgmlType.Q8_0 ? "dequantize_row_q8_0" : "dequantize_row_q4_0")
                    .invoke(Void.class, new Object[] {dst, back, (long) n});
            assertArrayEquals(back.getFloatArray(0, n),
                    GgmlQuants.dequantize(t, java.nio.ByteBuffer.wrap(theirs), n), 0f, t + " dequantization");
        }
    }

    private static float[] logProbs(DeepSeekForCausalLM lm, NDManager parent, long[] ids) {
        try (NDManager m = parent.newSubManager()) {
            NDArray input = m.create(ids).reshape(1, ids.length);
            NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(input), false).head(); // (1, T, V)
            float[] lp = logits.logSoftmax(-1).toFloatArray();
            int v = (int) logits.getShape().get(2);
            float[] out = new float[ids.length - 1];
            for (int i = 0; i < out.length; i++) {
                out[i] = lp[i * v + (int) ids[i + 1]];
            }
            return out;
        }
    }

    private static long[][] windows(Random rnd, int count, int length, int vocab) {
        long[][] w = new long[count][length];
        for (long[] ids : w) {
            for (int i = 0; i < length; i++) {
                ids[i] = rnd.nextInt(vocab);
            }
        }
        return w;
    }

    private static double loss(CliRun r) {
        assertEquals(0, r.exitCode, r.err);
        return JsonParser.parseString(r.out.trim()).getAsJsonObject().get("loss").getAsDouble();
    }

    private static double loss(PerplexityCommand.Evaluation e) {
        return e.loss();
    }
}
