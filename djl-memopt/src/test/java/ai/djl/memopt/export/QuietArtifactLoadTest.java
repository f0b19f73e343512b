package ai.djl.memopt.export;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.testing.ForkedJvm;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Loading an artifact prints nothing: the parameters are copied in with an indexed set, not DJL's
 * {@code set(ByteBuffer)}, whose native code opens libtorch's deprecated {@code AutoNonVariableTypeMode} and printed a
 * 480-character warning on the first load of every process (onto the demo's progress line). libtorch prints the
 * warning once per process, hence the fresh JVM.
 */
class QuietArtifactLoadTest {

    @TempDir Path tmp;

    @Test
    void loadingAnArtifactPrintsNoLibtorchWarning() throws Exception {
        ForkedJvm.Result r = ForkedJvm.run(ExportAndLoad.class, List.of(), List.of(tmp.resolve("int8").toString()),
                Duration.ofMinutes(3));
        assertEquals(0, r.exitCode(), r.output());
        assertTrue(r.output().contains("loaded 72 quantized layers"), r.output());
        assertFalse(r.output().contains("AutoNonVariableTypeMode"), r.output());
        assertFalse(r.output().contains("Warning"), r.output());
    }

    /** Exports the tiny V3 fixture as int8 into {@code args[0]} and loads it back. */
    public static final class ExportAndLoad {
        public static void main(String[] args) throws Exception {
            Path dir = Path.of(args[0]);
            try (NDManager m = NDManager.newBaseManager()) {
                DeepSeekForCausalLM lm = DeepSeekLoader.load(DeepSeekArtifactTest.V3, m, DataType.FLOAT32);
                Quantizer.quantize(lm, Int8WeightOnlyConfig.builder().build());
                QuantizedArtifact.export(lm, dir, ExportOptions.builder().optSourceModel(DeepSeekArtifactTest.V3)
                        .build());
            }
            try (NDManager m = NDManager.newBaseManager()) {
                QuantizedArtifact.loadDeepSeek(dir, m, DataType.FLOAT32);
                System.out.println("loaded " + QuantizedArtifact.verify(dir).layers().size() + " quantized layers");
            }
        }
    }
}
