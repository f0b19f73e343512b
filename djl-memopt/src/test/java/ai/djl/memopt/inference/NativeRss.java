package ai.djl.memopt.inference;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Resident memory outside the Java heap, from {@code /proc/self/smaps} (Linux): the sum of every mapping's {@code Rss}
 * except the Java heap's. The heap is the largest run of adjacent anonymous mappings (HotSpot reserves it in one piece,
 * {@code -Xmx} long; its committed and reserved parts show as neighbouring mappings). Plain RSS also moves when the JVM
 * first touches heap pages it committed earlier, which says nothing about native tensors.
 */
final class NativeRss {

    private static final Pattern HEADER = Pattern.compile("^([0-9a-f]+)-([0-9a-f]+) \\S+ \\S+ \\S+ \\S+\\s*(.*)$");

    private NativeRss() {}

    private record Mapping(long start, long end, boolean anonymous, long rss) {}

    static boolean available() {
        return Files.isReadable(Path.of("/proc/self/smaps"));
    }

    static long bytes() throws IOException {
        List<Mapping> maps = new ArrayList<>();
        long start = 0;
        long end = 0;
        boolean anonymous = false;
        boolean open = false;
        for (String line : Files.readAllLines(Path.of("/proc/self/smaps"))) {
            Matcher m = HEADER.matcher(line);
            if (m.matches()) {
                start = Long.parseUnsignedLong(m.group(1), 16);
                end = Long.parseUnsignedLong(m.group(2), 16);
                anonymous = m.group(3).isEmpty();
                open = true;
            } else if (open && line.startsWith("Rss:")) {
                long kb = Long.parseLong(line.replaceAll("[^0-9]", ""));
                maps.add(new Mapping(start, end, anonymous, kb * 1024));
                open = false;
            }
        }
        // the largest run of adjacent anonymous mappings is the Java heap
        int bestFrom = -1;
        int bestTo = -1;
        long bestSpan = 0;
        for (int i = 0; i < maps.size(); i++) {
            if (!maps.get(i).anonymous()) {
                continue;
            }
            int j = i;
            while (j + 1 < maps.size() && maps.get(j + 1).anonymous() && maps.get(j + 1).start() == maps.get(j).end()) {
                j++;
            }
            long span = maps.get(j).end() - maps.get(i).start();
            if (span > bestSpan) {
                bestSpan = span;
                bestFrom = i;
                bestTo = j;
            }
            i = j;
        }
        long total = 0;
        for (int i = 0; i < maps.size(); i++) {
            if (i < bestFrom || i > bestTo) {
                total += maps.get(i).rss();
            }
        }
        return total;
    }
}
