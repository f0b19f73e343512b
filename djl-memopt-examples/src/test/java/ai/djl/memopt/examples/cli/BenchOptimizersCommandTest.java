package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.examples.bench.LineChart;
import ai.djl.memopt.examples.bench.MarkdownTable;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.awt.image.BufferedImage;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import javax.imageio.ImageIO;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** {@code memopt bench optimizers} at toy size: two optimizers in their fresh JVMs, the table, the chart, bad options. */
class BenchOptimizersCommandTest {

    @TempDir Path tmp;
    private Path data;

    /** Three addresses' openings (a few thousand tokens): two for training, the demo's held-out one. */
    @BeforeEach
    void setUp() throws Exception {
        data = Files.createDirectories(tmp.resolve("sotu"));
        for (String name : List.of("1961_john_f_kennedy_d.txt", "1962_john_f_kennedy_d.txt",
                BenchOptimizersCommand.DEMO_HELD_OUT)) {
            String text = new String(BenchOptimizersCommandTest.class.getResourceAsStream(
                    "/ai/djl/memopt/examples/demo/sotu/" + name).readAllBytes(), java.nio.charset.StandardCharsets.UTF_8);
            Files.writeString(data.resolve(name), text.substring(0, 6000));
        }
    }

    /** A toy run's arguments, {@code extra} replacing the toy settings of the same names. */
    private static String[] tiny(String... extra) {
        List<String> toy = List.of("--steps", "4", "--eval-every", "2", "--hidden", "32", "--layers", "2", "--batch",
                "2", "--seq", "32", "--vocab", "300", "--heap", "512m", "--timeout", "300");
        List<String> args = new java.util.ArrayList<>(List.of("bench", "optimizers"));
        for (int i = 0; i < toy.size(); i += 2) {
            if (!List.of(extra).contains(toy.get(i))) {
                args.addAll(toy.subList(i, i + 2));
            }
        }
        args.addAll(List.of(extra));
        return args.toArray(new String[0]);
    }

    @Test
    void adamwAndAdamw8bitFromTheSameStartWriteTableAndChart() throws Exception {
        Path md = tmp.resolve("benchmarks.md");
        Files.writeString(md, "# Benchmarks\n\nprose before\n");
        Path png = tmp.resolve("img").resolve("curves.png");
        CliRun r = CliRun.run(tiny("--data", data.toString(), "--out", md.toString(), "--chart", png.toString(),
                "--json"));
        assertEquals(0, r.exitCode, r.err);
        String[] lines = r.out.trim().split("\n");
        assertEquals(2, lines.length, r.out);
        JsonObject adamw = JsonParser.parseString(lines[0]).getAsJsonObject();
        JsonObject eight = JsonParser.parseString(lines[1]).getAsJsonObject();
        assertEquals("adamw", adamw.get("optimizer").getAsString());
        assertEquals("adamw8bit", eight.get("optimizer").getAsString());
        for (JsonObject o : List.of(adamw, eight)) {
            assertEquals(4, o.getAsJsonArray("train_loss").size(), o.toString());
            // before the first step, after steps 2 and 4
            JsonArray held = o.getAsJsonArray("heldout");
            assertEquals(3, held.size(), o.toString());
            assertEquals(List.of(0L, 2L, 4L), List.of(held.get(0).getAsJsonArray().get(0).getAsLong(),
                    held.get(1).getAsJsonArray().get(0).getAsLong(), held.get(2).getAsJsonArray().get(0).getAsLong()));
            double last = held.get(2).getAsJsonArray().get(1).getAsDouble();
            assertEquals(last, o.get("heldout_loss").getAsDouble());
            assertEquals(Math.exp(last), o.get("heldout_perplexity").getAsDouble(), 1e-9 * Math.exp(last));
            // four steps at 3e-3 move a model of 300 tokens below its uniform loss, ln 300 = 5.70
            assertTrue(last < held.get(0).getAsJsonArray().get(1).getAsDouble(), o.toString());
            assertEquals(BenchOptimizersCommand.DEMO_HELD_OUT, o.get("heldout_file").getAsString());
        }
        // the same seed: the same weights score the held-out text the same before the first step, and the first
        // step's loss (before any update) is the same batch's
        assertEquals(adamw.getAsJsonArray("heldout").get(0).getAsJsonArray().get(1).getAsDouble(),
                eight.getAsJsonArray("heldout").get(0).getAsJsonArray().get(1).getAsDouble());
        assertEquals(adamw.getAsJsonArray("train_loss").get(0).getAsDouble(),
                eight.getAsJsonArray("train_loss").get(0).getAsDouble());
        // then the 8-bit moments make the runs differ, a little
        double relative = eight.get("heldout_loss_vs_adamw").getAsDouble();
        assertNotEquals(0.0, relative);
        assertTrue(Math.abs(relative) < 0.02, eight.toString());
        assertEquals(eight.get("heldout_loss").getAsDouble() / adamw.get("heldout_loss").getAsDouble() - 1, relative,
                1e-12);
        assertEquals(0.0, adamw.get("heldout_loss_vs_adamw").getAsDouble());
        // two FP32 moments per parameter against 8-bit moments (small tensors keep FP32 ones)
        long fp32State = adamw.get("optimizer_state_bytes").getAsLong();
        assertEquals(8 * adamw.get("parameters").getAsLong(), fp32State);
        assertTrue(eight.get("optimizer_state_bytes").getAsLong() < fp32State, eight.toString());

        List<List<String>> rows = MarkdownTable.read(md, BenchOptimizersCommand.TABLE);
        assertEquals(2, rows.size(), rows.toString());
        assertEquals(List.of("adamw", "fp32", "4", "2 x 32"), rows.get(0).subList(0, 4));
        assertEquals(List.of("adamw8bit", "fp32", "4", "2 x 32"), rows.get(1).subList(0, 4));
        assertEquals(String.format(java.util.Locale.ROOT, "%.4f", eight.get("heldout_loss").getAsDouble()),
                rows.get(1).get(5));
        assertEquals("+0.00%", rows.get(0).get(7));
        assertTrue(Files.readString(md).startsWith("# Benchmarks\n\nprose before\n"), "the prose is kept");

        BufferedImage image = ImageIO.read(png.toFile());
        assertEquals(800, image.getWidth());
        assertEquals(450, image.getHeight());
    }

    @Test
    void chartCurvesAreTrailingMeansOfTheStepsAndTheHeldOutPoints() {
        JsonObject r = new JsonObject();
        r.addProperty("optimizer", "adamw");
        JsonArray train = new JsonArray();
        for (int i = 1; i <= 12; i++) {
            train.add((double) i);
        }
        r.add("train_loss", train);
        JsonArray held = new JsonArray();
        held.add(JsonParser.parseString("[0, 7.5]"));
        held.add(JsonParser.parseString("[12, 3.25]"));
        r.add("heldout", held);
        List<LineChart.Series> s = BenchOptimizersCommand.curves(List.of(r));
        assertEquals(2, s.size());
        // steps 1..10: the mean so far; 11 and 12: the mean of the last 10 steps
        assertArrayEquals(new double[] {1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6.5, 7.5}, s.get(0).y(), 1e-12);
        assertEquals(12.0, s.get(0).x()[11]);
        assertArrayEquals(new double[] {0, 12}, s.get(1).x());
        assertArrayEquals(new double[] {7.5, 3.25}, s.get(1).y());
        assertTrue(s.get(1).markers() && !s.get(0).markers());
        assertEquals(s.get(0).color(), s.get(1).color(), "an optimizer's two curves share a colour");
    }

    @Test
    void badOptionsAreRejectedByName() throws Exception {
        CliRun unknown = CliRun.run(tiny("--data", data.toString(), "--optimizers", "adamw,lion"));
        assertNotEquals(0, unknown.exitCode);
        assertTrue(unknown.err.contains("--optimizers: unknown optimizer 'lion'"), unknown.err);

        CliRun steps = CliRun.run(tiny("--data", data.toString(), "--steps", "0"));
        assertNotEquals(0, steps.exitCode);
        assertTrue(steps.err.contains("--steps must be at least 2") && steps.err.contains("got 0"), steps.err);

        Path missing = tmp.resolve("no-such-corpus");
        CliRun noData = CliRun.run(tiny("--data", missing.toString()));
        assertNotEquals(0, noData.exitCode);
        assertTrue(noData.err.contains("--data " + missing + " does not exist"), noData.err);

        CliRun noHeldOut = CliRun.run(tiny("--data", data.toString(), "--held-out", "1999_nobody.txt"));
        assertNotEquals(0, noHeldOut.exitCode);
        assertTrue(noHeldOut.err.contains("--held-out 1999_nobody.txt: neither a file of --data"), noHeldOut.err);

        Path onlyHeldOut = Files.createDirectories(tmp.resolve("one"));
        Files.copy(data.resolve(BenchOptimizersCommand.DEMO_HELD_OUT),
                onlyHeldOut.resolve(BenchOptimizersCommand.DEMO_HELD_OUT));
        CliRun nothingLeft = CliRun.run(tiny("--data", onlyHeldOut.toString()));
        assertNotEquals(0, nothingLeft.exitCode);
        assertTrue(nothingLeft.err.contains("has no .txt file besides the held-out"), nothingLeft.err);

        CliRun dtype = CliRun.run(tiny("--data", data.toString(), "--dtype", "bf16"));
        assertNotEquals(0, dtype.exitCode);
        assertTrue(dtype.err.contains("--dtype: precision bf16 is not supported"), dtype.err);

        CliRun every = CliRun.run(tiny("--data", data.toString(), "--eval-every", "0"));
        assertNotEquals(0, every.exitCode);
        assertTrue(every.err.contains("--eval-every must be at least 1, got 0"), every.err);
    }
}
