package ai.djl.memopt.examples.cli;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.examples.wrap.UserModels;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Long quantizations are not silent: the quantizer reports each layer, and AWQ/GPTQ draw a progress bar. */
class QuantizeProgressTest {

    @TempDir Path tmp;

    @Test
    void theQuantizerTellsEachLayerInOrder() {
        try (NDManager m = NDManager.newBaseManager()) {
            Block mlp = UserModels.mlp(32, 10, 64, 48);
            mlp.initialize(m, DataType.FLOAT32, new Shape(2, 32));
            List<String> told = new ArrayList<>();
            QuantizationReport report = Quantizer.quantize(mlp, Int8WeightOnlyConfig.builder().build(),
                    (done, total, path) -> told.add(done + "/" + total + " " + path));
            assertEquals(List.of("1/3 1", "2/3 3", "3/3 5"), told);
            assertEquals(3, report.layers().size());
        }
    }

    @Test
    void awqShowsAProgressBarOnStderr() throws Exception {
        Path model = CliRun.v3WithTokenizer(Files.createDirectories(tmp.resolve("v3")));
        Path calibration = tmp.resolve("calib.ids");
        Files.writeString(calibration, "1 9 12 15 18 21 24 27\n1 30 33 36 39 42 45 48\n");
        CliRun r = CliRun.run("quantize", "--model", model.toString(), "--scheme", "int4", "--group-size", "32",
                "--method", "awq", "--awq-grid", "2", "--calibration", calibration.toString(), "--out",
                tmp.resolve("awq").toString(), "--json");
        assertEquals(0, r.exitCode, r.err);
        String last = r.err.substring(r.err.lastIndexOf('\r') + 1);
        assertTrue(last.startsWith("quantize awq [========================] 69/69 "), r.err);
        assertTrue(last.contains(", done)"), last);
        CliRun quiet = CliRun.run("quantize", "--model", model.toString(), "--scheme", "int4", "--group-size", "32",
                "--method", "awq", "--awq-grid", "2", "--calibration", calibration.toString(), "--out",
                tmp.resolve("awq2").toString(), "--json", "--no-progress");
        assertEquals(0, quiet.exitCode, quiet.err);
        assertTrue(!quiet.err.contains("quantize awq ["), quiet.err);
    }
}
