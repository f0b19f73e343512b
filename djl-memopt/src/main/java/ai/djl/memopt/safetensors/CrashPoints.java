package ai.djl.memopt.safetensors;

/**
 * Named points in the write paths where a test can make the JVM die as {@code kill -9} would: with
 * {@code -Dmemopt.crashAt=NAME} (or the environment variable {@code MEMOPT_CRASH_AT}), the first time the point
 * {@code NAME} is reached the process halts at once with exit status 137, running no shutdown hooks and flushing
 * nothing. {@code NAME#N} halts at the N-th time instead (1-based). Tests in a forked JVM use this to check that a
 * crash at every write step leaves the old result or the new one, complete.
 */
public final class CrashPoints {

    private static final String SPEC = spec();
    private static final java.util.concurrent.ConcurrentHashMap<String, java.util.concurrent.atomic.AtomicInteger>
            COUNTS = new java.util.concurrent.ConcurrentHashMap<>();

    private CrashPoints() {}

    private static String spec() {
        String s = System.getProperty("memopt.crashAt");
        if (s == null || s.isEmpty()) {
            s = System.getenv("MEMOPT_CRASH_AT");
        }
        return s == null || s.isEmpty() ? null : s;
    }

    /** Halts the JVM here if the crash point {@code name} was asked for (and this is its asked-for visit). */
    public static void reach(String name) {
        if (SPEC == null) {
            return;
        }
        int hash = SPEC.indexOf('#');
        String wanted = hash < 0 ? SPEC : SPEC.substring(0, hash);
        if (!wanted.equals(name)) {
            return;
        }
        int nth = hash < 0 ? 1 : Integer.parseInt(SPEC.substring(hash + 1));
        int visit = COUNTS.computeIfAbsent(name, k -> new java.util.concurrent.atomic.AtomicInteger()).incrementAndGet();
        if (visit == nth) {
            System.err.println("memopt: crash point " + name + " reached (visit " + visit + "): halting");
            System.err.flush();
            Runtime.getRuntime().halt(137);
        }
    }
}
