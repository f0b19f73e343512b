package ai.djl.memopt.testing;

import java.util.concurrent.Callable;

/** Runs test code with a system property set, restoring its previous value (or its absence) afterwards. */
public final class SystemProperties {

    private SystemProperties() {}

    public static <T> T with(String key, String value, Callable<T> body) throws Exception {
        return run(key, System.setProperty(key, value), body);
    }

    /** Runs {@code body} with {@code key} unset, restoring its previous value afterwards. */
    public static <T> T without(String key, Callable<T> body) throws Exception {
        return run(key, System.clearProperty(key), body);
    }

    private static <T> T run(String key, String before, Callable<T> body) throws Exception {
        try {
            return body.call();
        } finally {
            if (before == null) {
                System.clearProperty(key);
            } else {
                System.setProperty(key, before);
            }
        }
    }
}
