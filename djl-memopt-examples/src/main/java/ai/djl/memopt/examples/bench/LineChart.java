package ai.djl.memopt.examples.bench;

import ai.djl.memopt.safetensors.AtomicFiles;
import com.google.common.base.Preconditions;
import java.awt.BasicStroke;
import java.awt.Color;
import java.io.IOException;
import java.nio.file.Path;
import java.util.List;
import javax.imageio.ImageIO;
import org.jfree.chart.ChartFactory;
import org.jfree.chart.JFreeChart;
import org.jfree.chart.axis.NumberAxis;
import org.jfree.chart.plot.PlotOrientation;
import org.jfree.chart.plot.XYPlot;
import org.jfree.chart.renderer.xy.XYLineAndShapeRenderer;
import org.jfree.data.xy.XYSeries;
import org.jfree.data.xy.XYSeriesCollection;

/**
 * The benchmarks' line charts (e.g. loss curves): one PNG per run of a bench command ({@code --chart FILE}), written
 * atomically. A series drawn with markers reads as measured points (a held-out evaluation every N steps), one without
 * as a curve (a loss every step).
 *
 * <pre>{@code
 * LineChart.write(Path.of("docs/img/curves.png"), "Loss", "step", "loss (nats)", List.of(
 *         new LineChart.Series("adamw train", adamwSteps, adamwLosses, false, 0),
 *         new LineChart.Series("adamw held-out", evalSteps, evalLosses, true, 0)));
 * }</pre>
 */
public final class LineChart {

    /**
     * One line.
     *
     * @param name the legend's label
     * @param x the x values, ascending
     * @param y one y per x
     * @param markers whether each point is marked (measured points) or only joined (a dense curve)
     * @param color an index into the chart's palette: series of one group (an optimizer's training and held-out
     *     losses) share it
     */
    public record Series(String name, double[] x, double[] y, boolean markers, int color) {
        public Series {
            Preconditions.checkArgument(x.length == y.length, "series '%s' has %s x values and %s y values", name,
                    x.length, y.length);
            Preconditions.checkArgument(color >= 0, "series '%s': color index %s", name, color);
        }
    }

    /** Distinct on white and for the common colour-vision deficiencies (Okabe and Ito's palette). */
    private static final Color[] PALETTE = {new Color(0, 114, 178), new Color(213, 94, 0), new Color(0, 158, 115),
        new Color(204, 121, 167), new Color(86, 180, 233), new Color(230, 159, 0), Color.BLACK};

    private LineChart() {}

    /** Writes the series as lines on one plot; the value axis spans the data, not zero. */
    public static void write(Path file, String title, String xAxis, String yAxis, List<Series> series)
            throws IOException {
        Preconditions.checkArgument(!series.isEmpty(), "no series for chart %s", file);
        System.setProperty("java.awt.headless", "true");
        XYSeriesCollection data = new XYSeriesCollection();
        for (Series s : series) {
            XYSeries xy = new XYSeries(s.name(), false, true);
            for (int i = 0; i < s.x().length; i++) {
                xy.add(s.x()[i], s.y()[i]);
            }
            data.addSeries(xy);
        }
        JFreeChart chart = ChartFactory.createXYLineChart(title, xAxis, yAxis, data, PlotOrientation.VERTICAL,
                series.size() > 1, false, false);
        chart.setBackgroundPaint(Color.WHITE);
        XYPlot plot = chart.getXYPlot();
        plot.setBackgroundPaint(Color.WHITE);
        plot.setDomainGridlinePaint(Color.LIGHT_GRAY);
        plot.setRangeGridlinePaint(Color.LIGHT_GRAY);
        ((NumberAxis) plot.getRangeAxis()).setAutoRangeIncludesZero(false);
        XYLineAndShapeRenderer renderer = new XYLineAndShapeRenderer();
        for (int i = 0; i < series.size(); i++) {
            renderer.setSeriesShapesVisible(i, series.get(i).markers());
            renderer.setSeriesStroke(i, new BasicStroke(series.get(i).markers() ? 2.0f : 1.2f));
            renderer.setSeriesPaint(i, PALETTE[series.get(i).color() % PALETTE.length]);
        }
        plot.setRenderer(renderer);
        AtomicFiles.write(file, tmp -> ImageIO.write(chart.createBufferedImage(800, 450), "png", tmp.toFile()));
    }
}
