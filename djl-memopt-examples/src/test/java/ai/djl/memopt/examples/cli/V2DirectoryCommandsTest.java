package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;

import ai.djl.memopt.safetensors.SafetensorsFile;
import ai.djl.ndarray.NDManager;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.stream.Collectors;
import org.junit.jupiter.api.Test;

/** {@code memopt perplexity} and {@code memopt generate} on a DeepSeek-V2 directory, against transformers' numbers. */
class V2DirectoryCommandsTest {

    static final Path V2 = CliRun.FIXTURES.resolve("tiny-deepseek-v2");

    static String csv(long[] ids) {
        return Arrays.stream(ids).mapToObj(Long::toString).collect(Collectors.joining(","));
    }

    @Test
    void perplexityAndGreedyGenerationMatchTransformers() throws Exception {
        long[][] rows = new long[2][];
        long[] prompt;
        long[] greedy;
        float referenceLoss;
        try (NDManager m = NDManager.newBaseManager();
                SafetensorsFile ref = SafetensorsFile.open(V2.resolve("reference.safetensors"))) {
            long[] ids = ref.load(m, "input_ids").toLongArray(); // (2, 12)
            rows[0] = Arrays.copyOfRange(ids, 0, 12);
            rows[1] = Arrays.copyOfRange(ids, 12, 24);
            prompt = ref.load(m, "greedy_prompt").toLongArray();
            greedy = ref.load(m, "greedy_output").toLongArray();
            referenceLoss = ref.readFloats("loss")[0];
        }
        // transformers' loss is the mean over both rows, which predict 11 tokens each
        double sum = 0;
        for (long[] row : rows) {
            CliRun r = CliRun.run("perplexity", "--model", V2.toString(), "--token-ids", csv(row));
            assertEquals(0, r.exitCode, r.err);
            JsonObject o = JsonParser.parseString(r.out.strip()).getAsJsonObject();
            assertEquals(11, o.get("predicted").getAsInt());
            sum += o.get("loss").getAsDouble();
        }
        assertEquals(referenceLoss, sum / 2, 1e-5 * referenceLoss);

        CliRun g = CliRun.run("generate", "--model", V2.toString(), "--prompt-ids", csv(prompt), "--max-new-tokens",
                String.valueOf(greedy.length - prompt.length), "--json");
        assertEquals(0, g.exitCode, g.err);
        JsonArray out = JsonParser.parseString(g.out.strip()).getAsJsonObject().getAsJsonArray("output_ids");
        long[] generated = new long[out.size()];
        for (int i = 0; i < generated.length; i++) {
            generated[i] = out.get(i).getAsLong();
        }
        assertArrayEquals(Arrays.copyOfRange(greedy, prompt.length, greedy.length), generated);
    }
}
