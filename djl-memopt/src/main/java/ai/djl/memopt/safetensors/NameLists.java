package ai.djl.memopt.safetensors;

import java.util.Collection;
import java.util.Iterator;

/**
 * Lists of names (tensors, files) for error messages, capped: a checkpoint may hold a million tensors, and a message
 * that lists them all is megabytes that hide the one line that matters.
 */
public final class NameLists {

    /** How many names a message shows before "... and K more". */
    public static final int DEFAULT_SHOWN = 10;

    private NameLists() {}

    /** {@code [a, b, c]}, or the first {@link #DEFAULT_SHOWN} names and {@code ... and K more}. */
    public static String abbreviate(Collection<String> names) {
        return abbreviate(names, DEFAULT_SHOWN);
    }

    /** {@code [a, b, c]}, or the first {@code shown} names and {@code ... and K more}. */
    public static String abbreviate(Collection<String> names, int shown) {
        StringBuilder b = new StringBuilder("[");
        Iterator<String> it = names.iterator();
        for (int i = 0; i < shown && it.hasNext(); i++) {
            b.append(i == 0 ? "" : ", ").append(it.next());
        }
        b.append(']');
        if (names.size() > shown) {
            b.append(" and ").append(names.size() - shown).append(" more");
        }
        return b.toString();
    }
}
