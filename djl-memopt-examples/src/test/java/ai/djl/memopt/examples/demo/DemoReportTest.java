package ai.djl.memopt.examples.demo;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class DemoReportTest {

    @TempDir Path tmp;

    @Test
    void tableAndHtmlCarryEveryFigureAndCharts() throws IOException {
        DemoReport report = new DemoReport(
                List.of(new VariantResult("fp32", 3L << 30, 230L << 20, 40L << 20, 21.5, 33.3, "The <Congress>"),
                        new VariantResult("int4", 2L << 30, 231L << 20, 7L << 20, 22.75, 28.0, "We shall")),
                List.of(new double[] {0, 6.0}, new double[] {10, 4.5}), "bench-tiny, 20 steps, cpu");
        String table = report.table();
        assertTrue(table.contains("fp32") && table.contains("3.00 GiB") && table.contains("40.0 MiB")
                && table.contains("21.500") && table.contains("33.3") && table.contains("230.0 MiB"), table);
        assertEquals(4, table.lines().count(), table);
        Path html = tmp.resolve("out/report.html");
        report.writeHtml(html);
        String page = Files.readString(html);
        assertTrue(page.contains("22.750") && page.contains("7.0 MiB"), "figures in the page");
        assertEquals(4, page.split("data:image/png;base64,", -1).length - 1, "four charts embedded");
        assertTrue(page.contains("The &lt;Congress&gt;"), "samples are escaped");
        assertThrows(IllegalArgumentException.class, () -> new VariantResult("x", 1, 1, 0, 1, 1, ""));
    }
}
