package ai.djl.memopt.safetensors;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.memopt.testing.ForkedJvm;
import ai.djl.memopt.testing.JavaBuffers;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Loads tensors again and again, keeps handles on them that DJL 0.36 does not copy (no-op {@code toType}/
 * {@code toDevice}, views, {@code stopGradient}) past the loaded arrays and the managers they were loaded in, collects
 * garbage and refills freed native memory, then reads and updates the kept handles in place, as an optimizer's state
 * does. Run in a forked JVM: arrays over Java buffers that the collector freed made this read garbage, or crash the
 * JVM in malloc or with SIGSEGV (freed large buffers are unmapped), which fails the test instead of killing the suite.
 */
class LoadedArraysStressTest {

    private static final int ITERATIONS = 150;
    /** Handles kept alive at a time (the oldest is dropped, so their memory churns). */
    private static final int KEPT = 24;

    @TempDir Path tmp;

    /** Forked: {@code args[0]} a fresh directory. Prints "checked N handles" and exits 0, or exits 1 naming the bad one. */
    public static void main(String[] args) throws Exception {
        Path dir = Path.of(args[0]);
        // small tensors come from malloc's bins (reused at once), large ones are mmapped (unmapped when freed)
        Map<String, float[]> expected = TensorZoo.write(dir.resolve(HfCheckpoint.SINGLE_FILE), 7, 8, 256, 4096,
                64 * 1024, 512 * 1024);
        List<String> names = new ArrayList<>(expected.keySet());
        SplittableRandom random = new SplittableRandom(11);
        List<Kept> kept = new ArrayList<>();
        long checked = 0;
        try (HfCheckpoint ckpt = HfCheckpoint.open(dir); NDManager base = NDManager.newBaseManager(Device.cpu())) {
            for (int it = 0; it < ITERATIONS; it++) {
                try (NDManager tmp = base.newSubManager()) {
                    for (int j = 0; j < 4; j++) {
                        String name = names.get(random.nextInt(names.size()));
                        int how = random.nextInt(5);
                        NDArray loaded = how == 4 && ckpt.info(name).dtype().isFloating()
                                ? ckpt.load(tmp, name, DataType.FLOAT32) : ckpt.load(tmp, name);
                        NDArray alias = alias(loaded, random.nextInt(5));
                        alias.attach(base); // outlives tmp, as restored optimizer state did
                        kept.add(new Kept(name, alias, expected.get(name)));
                    }
                } // closes the loaded arrays: DJL drops their Java buffers
                while (kept.size() > KEPT) {
                    kept.remove(0).array.close();
                }
                JavaBuffers.overwriteFreedMemory();
                for (Kept k : kept) {
                    float[] now = floats(k.array);
                    if (!Arrays.equals(k.expected, now)) {
                        System.out.println("iteration " + it + ": a handle on " + k.name + " reads "
                                + Arrays.toString(Arrays.copyOf(now, 4)) + "..., the file holds "
                                + Arrays.toString(Arrays.copyOf(k.expected, 4)) + "...");
                        System.exit(1);
                    }
                    if (k.array.getDataType().isFloating()) {
                        k.array.muli(2).divi(2); // in-place writes, exact for these values
                    }
                    checked++;
                }
            }
        }
        System.out.println("checked " + checked + " handles");
    }

    private static NDArray alias(NDArray a, int how) {
        switch (how) {
            case 0:
                return a.toType(a.getDataType(), true);
            case 1:
                return a.toDevice(Device.cpu(), true);
            case 2:
                return a.reshape(-1).reshape(a.getShape());
            case 3:
                return a.stopGradient();
            default:
                return a.get("...");
        }
    }

    private static float[] floats(NDArray a) {
        try (NDArray f = a.toType(DataType.FLOAT32, true)) {
            return f.toFloatArray();
        }
    }

    private record Kept(String name, NDArray array, float[] expected) {}

    @Test
    void handlesOnLoadedArraysStayValidAfterTheLoadedArraysAreGone() throws Exception {
        // a native crash is reported in seconds, into the temporary directory, not after the JVM's 2 minutes
        List<String> jvm = List.of("-Xmx256m", "-XX:ErrorLogTimeout=5", "-XX:-CreateCoredumpOnCrash",
                "-XX:ErrorFile=" + tmp.resolve("hs_err_%p.log"));
        Path dir = Files.createDirectories(tmp.resolve("zoo"));
        ForkedJvm.Result r = ForkedJvm.run(LoadedArraysStressTest.class, jvm, List.of(dir.toString()),
                Duration.ofMinutes(3));
        assertEquals(0, r.exitCode(), r.output());
        long handles = 0;
        for (int it = 0; it < ITERATIONS; it++) {
            handles += Math.min(4 * (it + 1), KEPT);
        }
        assertTrue(r.output().contains("checked " + handles + " handles"), r.output());
    }
}
