package ai.djl.memopt.examples.demo;

import ai.djl.memopt.safetensors.AtomicFiles;
import com.google.common.collect.ImmutableList;
import com.google.common.html.HtmlEscapers;
import java.awt.Color;
import java.awt.image.BufferedImage;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.file.Path;
import java.util.Base64;
import java.util.List;
import java.util.Locale;
import javax.imageio.ImageIO;
import org.jfree.chart.ChartFactory;
import org.jfree.chart.JFreeChart;
import org.jfree.chart.plot.PlotOrientation;
import org.jfree.data.category.DefaultCategoryDataset;
import org.jfree.data.xy.XYSeries;
import org.jfree.data.xy.XYSeriesCollection;

/**
 * The demo's closing table and its HTML report with charts (loss curve, memory by variant, perplexity by variant),
 * drawn with JFreeChart and embedded in the page as PNG data, so the report is one self-contained file.
 */
public final class DemoReport {

    private final List<VariantResult> variants;
    private final List<double[]> lossCurve;
    private final String settings;

    /**
     * @param variants the measured variants, in the order to show them
     * @param lossCurve training loss as {step, loss} pairs
     * @param settings one line describing the run (model, steps, device)
     */
    public DemoReport(List<VariantResult> variants, List<double[]> lossCurve, String settings) {
        this.variants = ImmutableList.copyOf(variants);
        this.lossCurve = ImmutableList.copyOf(lossCurve);
        this.settings = settings;
    }

    /** Printed under the table: what the memory columns measure, and why they need not follow weight bytes. */
    public static final String PEAK_MEMORY_NOTE = "peak memory is the measuring JVM's peak resident set; 'runtime' is"
            + " the part present before any weight\n(the JVM and libtorch). At this toy size the work of scoring and"
            + " generating, not the weights, sets the\npeak: int8 and int4 dequantize each layer's weights as it runs,"
            + " so a smaller variant can peak higher.\nWeight bytes and perplexity are the columns that compare the"
            + " variants; docs/benchmarks.md measures memory\nat sizes where weights dominate.";

    /** A fixed-width table, one row per variant. */
    public String table() {
        StringBuilder sb = new StringBuilder();
        String header = String.format(Locale.ROOT, "%-8s %12s %12s %13s %11s %9s", "variant", "peak memory",
                "runtime", "weight bytes", "perplexity", "tokens/s");
        sb.append(header).append('\n').append("-".repeat(header.length())).append('\n');
        for (VariantResult v : variants) {
            sb.append(String.format(Locale.ROOT, "%-8s %12s %12s %13s %11.3f %9.1f%n", v.name(),
                    humanBytes(v.peakMemoryBytes()), humanBytes(v.runtimeBytes()), humanBytes(v.weightBytes()),
                    v.perplexity(), v.tokensPerSecond()));
        }
        return sb.toString();
    }

    /** Writes the HTML report atomically. */
    public void writeHtml(Path file) throws IOException {
        StringBuilder html = new StringBuilder();
        html.append("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>memopt demo</title>")
                .append("<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:")
                .append("collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,")
                .append("th:first-child{text-align:left}pre{white-space:pre-wrap;background:#f6f6f6;padding:8px}")
                .append("</style></head><body>\n<h1>memopt demo</h1>\n<p>").append(esc(settings)).append("</p>\n");
        html.append("<h2>Variants</h2>\n<table><tr><th>variant</th><th>peak memory</th><th>runtime</th>")
                .append("<th>weight bytes</th><th>held-out perplexity</th><th>tokens/s</th></tr>\n");
        for (VariantResult v : variants) {
            html.append(String.format(Locale.ROOT,
                    "<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%.3f</td><td>%.1f</td></tr>%n",
                    esc(v.name()), humanBytes(v.peakMemoryBytes()), humanBytes(v.runtimeBytes()),
                    humanBytes(v.weightBytes()), v.perplexity(), v.tokensPerSecond()));
        }
        html.append("</table>\n<p>").append(esc(PEAK_MEMORY_NOTE.replace('\n', ' '))).append("</p>\n");
        html.append("<h2>Charts</h2>\n");
        try {
            html.append(img("Training loss", lossChart()));
            html.append(img("Peak memory by variant", barChart("Peak memory by variant", "MiB", true)));
            html.append(img("Weight bytes by variant", barChart("Weight bytes by variant", "MiB", false)));
            html.append(img("Held-out perplexity by variant", perplexityChart()));
        } catch (RuntimeException | Error e) {
            // charts need AWT fonts; a machine without them still gets the tables
            html.append("<p>(charts could not be drawn on this machine: ").append(esc(String.valueOf(e)))
                    .append(")</p>\n");
        }
        html.append("<h2>Samples</h2>\n");
        for (VariantResult v : variants) {
            html.append("<h3>").append(esc(v.name())).append("</h3><pre>").append(esc(v.sample())).append("</pre>\n");
        }
        html.append("</body></html>\n");
        AtomicFiles.writeString(file, html.toString());
    }

    private JFreeChart lossChart() {
        XYSeries series = new XYSeries("training loss");
        for (double[] p : lossCurve) {
            series.add(p[0], p[1]);
        }
        JFreeChart chart = ChartFactory.createXYLineChart("Training loss", "step", "loss (nats)",
                new XYSeriesCollection(series), PlotOrientation.VERTICAL, false, false, false);
        chart.setBackgroundPaint(Color.WHITE);
        return chart;
    }

    private JFreeChart barChart(String title, String unit, boolean peak) {
        DefaultCategoryDataset data = new DefaultCategoryDataset();
        for (VariantResult v : variants) {
            data.addValue((peak ? v.peakMemoryBytes() : v.weightBytes()) / (1024.0 * 1024.0), unit, v.name());
        }
        JFreeChart chart = ChartFactory.createBarChart(title, "variant", unit, data, PlotOrientation.VERTICAL,
                false, false, false);
        chart.setBackgroundPaint(Color.WHITE);
        return chart;
    }

    private JFreeChart perplexityChart() {
        DefaultCategoryDataset data = new DefaultCategoryDataset();
        for (VariantResult v : variants) {
            data.addValue(v.perplexity(), "perplexity", v.name());
        }
        JFreeChart chart = ChartFactory.createBarChart("Held-out perplexity by variant", "variant", "perplexity",
                data, PlotOrientation.VERTICAL, false, false, false);
        chart.setBackgroundPaint(Color.WHITE);
        return chart;
    }

    private static String img(String alt, JFreeChart chart) {
        System.setProperty("java.awt.headless", "true");
        BufferedImage image = chart.createBufferedImage(720, 360);
        ByteArrayOutputStream png = new ByteArrayOutputStream();
        try {
            ImageIO.write(image, "png", png);
        } catch (IOException e) {
            throw new IllegalStateException("PNG encoding failed", e);
        }
        return "<p><img alt=\"" + esc(alt) + "\" src=\"data:image/png;base64,"
                + Base64.getEncoder().encodeToString(png.toByteArray()) + "\"></p>\n";
    }

    static String humanBytes(long bytes) {
        if (bytes < 0) {
            return "n/a";
        }
        if (bytes < 1024 * 1024) {
            return String.format(Locale.ROOT, "%.1f KiB", bytes / 1024.0);
        }
        if (bytes < 1024L * 1024 * 1024) {
            return String.format(Locale.ROOT, "%.1f MiB", bytes / (1024.0 * 1024));
        }
        return String.format(Locale.ROOT, "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
    }

    private static String esc(String s) {
        return HtmlEscapers.htmlEscaper().escape(s == null ? "" : s);
    }
}
