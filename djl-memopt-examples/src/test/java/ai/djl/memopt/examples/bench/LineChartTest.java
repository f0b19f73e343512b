package ai.djl.memopt.examples.bench;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.awt.image.BufferedImage;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import javax.imageio.ImageIO;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class LineChartTest {

    @TempDir Path tmp;

    /** Pixels within 24 per channel of this colour (the lines are anti-aliased: thin ones are seldom exact). */
    private static int count(BufferedImage image, int rgb) {
        int n = 0;
        for (int y = 0; y < image.getHeight(); y++) {
            for (int x = 0; x < image.getWidth(); x++) {
                int p = image.getRGB(x, y);
                boolean near = true;
                for (int shift = 0; shift <= 16; shift += 8) {
                    near &= Math.abs(((p >> shift) & 0xFF) - ((rgb >> shift) & 0xFF)) <= 24;
                }
                n += near ? 1 : 0;
            }
        }
        return n;
    }

    @Test
    void drawsEachGroupInItsPaletteColour() throws Exception {
        Path png = tmp.resolve("charts").resolve("c.png");
        double[] x = {1, 2, 3, 4};
        LineChart.write(png, "t", "step", "loss", List.of(
                new LineChart.Series("a train", x, new double[] {5, 4, 3.5, 3.2}, false, 0),
                new LineChart.Series("a held-out", new double[] {0, 4}, new double[] {5.1, 3.4}, true, 0)));
        BufferedImage one = ImageIO.read(png.toFile());
        assertEquals(800, one.getWidth());
        int blue = 0x0072B2;
        int vermilion = 0xD55E00;
        assertTrue(count(one, blue) > 100, "the first group's lines");
        assertEquals(0, count(one, vermilion), "no second group yet");

        LineChart.write(png, "t", "step", "loss", List.of(
                new LineChart.Series("a train", x, new double[] {5, 4, 3.5, 3.2}, false, 0),
                new LineChart.Series("b train", x, new double[] {5, 4.2, 3.6, 3.3}, false, 1)));
        BufferedImage two = ImageIO.read(png.toFile());
        assertTrue(count(two, vermilion) > 100, "the second group's line");
        try (var s = Files.list(png.getParent())) {
            assertEquals(1, s.count(), "written atomically: no temporary file left");
        }
    }

    @Test
    void rejectsMismatchedSeries() {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> new LineChart.Series("adamw held-out", new double[] {1, 2}, new double[] {3}, true, 0));
        assertTrue(e.getMessage().contains("series 'adamw held-out' has 2 x values and 1 y values"), e.getMessage());
    }
}
