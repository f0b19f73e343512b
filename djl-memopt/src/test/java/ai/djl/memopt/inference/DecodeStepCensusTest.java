package ai.djl.memopt.inference;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.lang.management.GarbageCollectorMXBean;
import java.lang.management.ManagementFactory;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import javax.management.ObjectName;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

/**
 * How many native objects a decode step creates, per path: the {@code PtNDArray}s (one per native operation result)
 * and the {@code IValue}s (one per TorchScript argument or result) allocated per generated token, counted with a class
 * histogram under the Epsilon GC (which frees nothing, so the histogram counts every object ever allocated). Skipped
 * under any other collector; run it with
 *
 * <pre>
 * mvn -B -ntp -q -o -pl djl-memopt test -Dtest=DecodeStepCensusTest \
 *     -Dsurefire.argLine="-Dai.djl.offline=true -Dai.djl.pytorch.num_threads=1 -Dai.djl.pytorch.num_interop_threads=1 \
 *     -Xmx3g -XX:+UnlockExperimentalVMOptions -XX:+UseEpsilonGC"
 * </pre>
 *
 * The counts are printed (the test's output file) for the Java path and the TorchScript step.
 */
@ExtendWith(OneThread.class)
class DecodeStepCensusTest {

    private static final Pattern ROW = Pattern.compile("^\\s*\\d+:\\s+(\\d+)\\s+\\d+\\s+(\\S+)", Pattern.MULTILINE);

    @Test
    void nativeObjectsPerDecodedToken() throws Exception {
        boolean epsilon = false;
        for (GarbageCollectorMXBean gc : ManagementFactory.getGarbageCollectorMXBeans()) {
            epsilon |= gc.getName().contains("Epsilon");
        }
        Assumptions.assumeTrue(epsilon, "needs -XX:+UseEpsilonGC (see the class documentation)");
        long[] java = perToken(DecodePath.JAVA);
        long[] script = perToken(DecodePath.TORCHSCRIPT);
        System.out.printf("per decoded token, batch 1, tiny-deepseek-v3 FP32: Java path %d PtNDArray, %d IValue;"
                + " TorchScript step %d PtNDArray, %d IValue%n", java[0], java[1], script[0], script[1]);
        assertTrue(script[0] < java[0], "the script creates fewer arrays than the Java path");
    }

    /** {PtNDArray, IValue} allocated per token: the difference between a long and a short generation. */
    private static long[] perToken(DecodePath path) throws IOException {
        try (TestModel loaded = TestModel.load(MlaCachedDecoderTest.fixture("tiny-deepseek-v3"), DataType.FLOAT32);
                NDManager m = NDManager.newBaseManager()) {
            MlaCachedDecoder lm = new MlaCachedDecoder(loaded.model(), Device.cpu(), ExpertDispatch.GATHERED, path);
            assertEquals(path, lm.decodePath());
            Generator g = new Generator(lm, null);
            int shortRun = 10;
            int longRun = 60;
            generate(g, m, shortRun); // warm-up: the module compiled, the stacks built
            long[] a = census();
            generate(g, m, shortRun);
            long[] b = census();
            generate(g, m, longRun);
            long[] c = census();
            long tokens = longRun - shortRun;
            return new long[] {((c[0] - b[0]) - (b[0] - a[0])) / tokens, ((c[1] - b[1]) - (b[1] - a[1])) / tokens};
        }
    }

    private static void generate(Generator g, NDManager m, int tokens) {
        SamplingParams params = SamplingParams.builder().setMaxNewTokens(tokens).optIgnoreEos(true).build();
        g.generate(m, List.of(new long[] {451, 340, 497}), params, null, () -> false);
    }

    /** Instances ever allocated of PtNDArray and IValue (Epsilon frees none). */
    private static long[] census() {
        String histogram;
        try {
            histogram = (String) ManagementFactory.getPlatformMBeanServer().invoke(
                    new ObjectName("com.sun.management:type=DiagnosticCommand"), "gcClassHistogram",
                    new Object[] {new String[0]}, new String[] {String[].class.getName()});
        } catch (javax.management.JMException e) {
            throw new IllegalStateException("cannot take a class histogram", e);
        }
        long[] out = new long[2];
        Matcher row = ROW.matcher(histogram);
        while (row.find()) {
            if (row.group(2).equals("ai.djl.pytorch.engine.PtNDArray")) {
                out[0] = Long.parseLong(row.group(1));
            } else if (row.group(2).equals("ai.djl.pytorch.jni.IValue")) {
                out[1] = Long.parseLong(row.group(1));
            }
        }
        return out;
    }
}
