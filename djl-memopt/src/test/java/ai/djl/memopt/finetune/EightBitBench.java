package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.pytorch.jni.JniUtils;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Comparator;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.SplittableRandom;
import java.util.TreeMap;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * A benchmark of one 8-bit AdamW update (not a test): parameters shaped like bench-small's decoder layers (attention
 * with low-rank projections, norms, a dense MLP, one parameter that is not a multiple of the block size), FP32 masters,
 * FP16 gradients of a scaled loss and FP16 working copies, updated by
 * <ol>
 *   <li>the per-parameter update with the reference binary-search encode and chunks of 2^20 (the algorithm before
 *       the key tables and buckets),</li>
 *   <li>the per-parameter update with the key tables (the CPU default chunk),</li>
 *   <li>{@link EightBitAdamW#stepAll} (buckets), at the CPU's default chunk and at the GPU's.</li>
 * </ol>
 * For each: milliseconds per update (median of the timed steps) and the number of top-level ATen operations of one
 * update, counted by libtorch's profiler. All variants must end with the same bits (checked; exit code 1 if not).
 *
 * <pre>
 * java -cp djl-memopt/target/test-classes:djl-memopt/target/classes:$(cat cp.txt) \
 *     ai.djl.memopt.finetune.EightBitBench [elements, default 30000000] [timed steps, default 3]
 * </pre>
 */
public final class EightBitBench {

    private EightBitBench() {}

    /** One decoder layer of bench-small (hidden 1024, q rank 384, kv rank 256, 16 heads, dense MLP 2816). */
    private static final long[][] LAYER = {
        {384, 1024}, {384}, {1536, 384}, {288, 1024}, {256}, {2048, 256}, {1024, 1024}, {1024}, {1024},
        {2816, 1024}, {2816, 1024}, {1024, 2816}, {7, 1000}};

    public static void main(String[] args) throws IOException {
        long elements = args.length > 0 ? Long.parseLong(args[0]) : 30_000_000L;
        int timed = args.length > 1 ? Integer.parseInt(args[1]) : 3;
        List<Shape> shapes = new ArrayList<>();
        long total = 0;
        while (total < elements) {
            for (long[] s : LAYER) {
                shapes.add(new Shape(s));
                total += new Shape(s).size();
            }
        }
        System.out.printf(Locale.ROOT, "%d parameters, %,d elements%n", shapes.size(), total);
        String[] names = {"search encode, per parameter, chunk 2^20", "key tables, per parameter, chunk 2^20",
            "key tables, buckets (stepAll), chunk 2^20", "key tables, buckets (stepAll), chunk 2^23"};
        int n = names.length;
        NDManager[] managers = new NDManager[n];
        EightBitAdamW[] opts = new EightBitAdamW[n];
        Params[] params = new Params[n];
        long[][] wall = new long[n][timed];
        long[][] cpu = new long[n][timed];
        for (int v = 0; v < n; v++) {
            managers[v] = NDManager.newBaseManager();
            opts[v] = EightBitAdamW.builder().setManager(managers[v]).optLearningRate(1e-4f).optWeightDecay(0.01f)
                    .optChunkElements(v == 3 ? 1L << 23 : 1L << 20).optSearchEncode(v == 0).build();
            params[v] = new Params(managers[v], shapes);
            params[v].update(opts[v], v >= 2); // the first step makes the state (and plans the buckets)
        }
        // timed steps interleaved (v0 v1 v2 v3 v0 ...), so that the load of a shared machine falls on all alike
        for (int t = 0; t < timed; t++) {
            for (int v = 0; v < n; v++) {
                long c0 = processCpuNanos();
                long t0 = System.nanoTime();
                params[v].update(opts[v], v >= 2);
                wall[v][t] = System.nanoTime() - t0;
                cpu[v][t] = processCpuNanos() - c0;
            }
        }
        byte[] first = null;
        boolean same = true;
        for (int v = 0; v < n; v++) {
            Path trace = Files.createTempFile("eightbit", ".json");
            JniUtils.startProfile(false, false, false);
            params[v].update(opts[v], v >= 2);
            JniUtils.stopProfile(trace.toString());
            Map<String, Double> byName = new TreeMap<>();
            int[] ops = countOps(trace, byName);
            Files.deleteIfExists(trace);
            Arrays.sort(wall[v]);
            Arrays.sort(cpu[v]);
            System.out.printf(Locale.ROOT, "%-45s %9.1f ms/update (median wall), %9.1f ms CPU, %6d top-level ops"
                    + " (%d in all)%n", names[v], wall[v][timed / 2] / 1e6, cpu[v][timed / 2] / 1e6, ops[0], ops[1]);
            if (System.getProperty("ops") != null) {
                byName.entrySet().stream().sorted((a, c) -> Double.compare(c.getValue(), a.getValue())).limit(12)
                        .forEach(x -> System.out.printf(Locale.ROOT, "    %-28s %8.1f ms%n", x.getKey(), x.getValue()));
            }
            byte[] bytes = params[v].bytes(opts[v]);
            first = first == null ? bytes : first;
            same &= Arrays.equals(first, bytes);
            opts[v].close();
            managers[v].close();
        }
        System.out.println(same ? "all variants: the same weights, FP16 copies and 8-bit state, bit for bit"
                : "VARIANTS DIFFER");
        if (!same) {
            System.exit(1);
        }
    }

    /** CPU time of the whole process (all of libtorch's threads), in nanoseconds. */
    private static long processCpuNanos() {
        java.lang.management.OperatingSystemMXBean os = java.lang.management.ManagementFactory
                .getOperatingSystemMXBean();
        return os instanceof com.sun.management.OperatingSystemMXBean
                ? ((com.sun.management.OperatingSystemMXBean) os).getProcessCpuTime() : 0;
    }

    /**
     * Top-level ATen operations (not inside another on the same thread), all of them, and the top-level ones' total
     * time by name, from the profiler's Chrome trace.
     */
    static int[] countOps(Path trace, Map<String, Double> millisByName) throws IOException {
        String json = Files.readString(trace, StandardCharsets.UTF_8);
        Matcher e = Pattern.compile("\"name\": ?\"(aten::[^\"]*)\",\\s*\"ph\": ?\"X\",\\s*\"ts\": ?([0-9.]+),"
                + "\\s*\"dur\": ?([0-9.]+),\\s*\"tid\": ?([0-9]+)").matcher(json);
        List<Object[]> events = new ArrayList<>();
        while (e.find()) {
            events.add(new Object[] {e.group(1), Double.parseDouble(e.group(2)), Double.parseDouble(e.group(3)),
                Long.parseLong(e.group(4))});
        }
        events.sort(Comparator.<Object[], Long>comparing(a -> (Long) a[3]).thenComparing(a -> (Double) a[1])
                .thenComparing(a -> -(Double) a[2]));
        int top = 0;
        double end = -1;
        long tid = -1;
        for (Object[] ev : events) {
            double ts = (Double) ev[1];
            if ((Long) ev[3] != tid || ts >= end) {
                top++;
                tid = (Long) ev[3];
                end = ts + (Double) ev[2];
                millisByName.merge((String) ev[0], (Double) ev[2] / 1e3, Double::sum);
            }
        }
        return new int[] {top, events.size()};
    }

    /** Seeded masters, FP16 working copies and FP16 gradients (a loss scale of 1024). */
    private static final class Params {
        final List<String> ids = new ArrayList<>();
        final List<NDArray> masters = new ArrayList<>();
        final List<NDArray> grads = new ArrayList<>();
        final List<NDArray> copies = new ArrayList<>();

        Params(NDManager m, List<Shape> shapes) {
            SplittableRandom r = new SplittableRandom(42);
            for (int i = 0; i < shapes.size(); i++) {
                Shape s = shapes.get(i);
                ids.add("p" + i);
                NDArray w = m.create(gaussian(r, s.size(), 0.02), s);
                masters.add(w);
                copies.add(w.toType(DataType.FLOAT16, true));
                try (NDArray g = m.create(gaussian(r, s.size(), 1e-3 * 1024), s)) {
                    grads.add(g.toType(DataType.FLOAT16, true));
                }
            }
        }

        void update(EightBitAdamW opt, boolean buckets) {
            if (buckets) {
                opt.stepAll(ids, masters, grads, 1024f, copies);
            } else {
                for (int i = 0; i < ids.size(); i++) {
                    opt.step(ids.get(i), masters.get(i), grads.get(i), 1024f, copies.get(i));
                }
            }
        }

        byte[] bytes(EightBitAdamW opt) {
            java.io.ByteArrayOutputStream out = new java.io.ByteArrayOutputStream();
            for (int i = 0; i < ids.size(); i++) {
                out.writeBytes(masters.get(i).toByteArray());
                out.writeBytes(copies.get(i).toByteArray());
                for (NDArray a : opt.stateArrays(ids.get(i)).values()) {
                    out.writeBytes(a.toByteArray());
                }
            }
            return out.toByteArray();
        }

        private static float[] gaussian(SplittableRandom r, long n, double scale) {
            float[] a = new float[(int) n];
            for (int i = 0; i < a.length; i++) {
                a[i] = (float) (r.nextGaussian() * scale);
            }
            return a;
        }
    }
}
