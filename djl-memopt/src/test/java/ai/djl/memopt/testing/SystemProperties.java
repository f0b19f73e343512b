package ai.djl.memopt.testing;

import java.util.concurrent.Callable;

/** Runs test code with a system property set, restoring its previous value (or its absence) afterwards. */
public final class SystemProperties {

    private SystemProperties() {}

    public static <T> T with(String key, String value, Callable<T> body) throws Exception {
        String before = System.setProperty(key, value);
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
