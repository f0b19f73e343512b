package ai.djl.memopt.examples.bench;

import ai.djl.memopt.safetensors.AtomicFiles;
import java.awt.Color;
import java.io.IOException;
import java.nio.file.Path;
import javax.imageio.ImageIO;
import org.jfree.chart.ChartFactory;
import org.jfree.chart.JFreeChart;
import org.jfree.chart.plot.PlotOrientation;
import org.jfree.data.category.DefaultCategoryDataset;

/** The benchmarks' bar charts: one PNG per run of a bench command ({@code --chart FILE}), written atomically. */
public final class BarChart {

    private BarChart() {}

    /**
     * Writes a grouped bar chart.
     *
     * @param data values by (series, category)
     */
    public static void write(Path file, String title, String categoryAxis, String valueAxis,
            DefaultCategoryDataset data) throws IOException {
        System.setProperty("java.awt.headless", "true");
        JFreeChart chart = ChartFactory.createBarChart(title, categoryAxis, valueAxis, data, PlotOrientation.VERTICAL,
                data.getRowCount() > 1, false, false);
        chart.setBackgroundPaint(Color.WHITE);
        AtomicFiles.write(file, tmp -> ImageIO.write(chart.createBufferedImage(640, 320), "png", tmp.toFile()));
    }
}
