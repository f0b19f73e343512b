package ai.djl.memopt.finetune;

import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableSortedMap;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.SortedMap;
import java.util.TreeSet;
import java.util.stream.Stream;

/**
 * What makes a training run the run it is: the settings and inputs that decide its weights step by step (the model's
 * architecture and trainable parameters, the data's fingerprint, sequence length, batch, precision, optimizer,
 * learning-rate schedule, seed...), as named string values. Training checkpoints record the identity of the run that
 * wrote them; a run resumes only from a checkpoint of its own identity, and prunes only its own checkpoints.
 *
 * <p>Settings that change memory or speed but not the result (activation checkpointing, the loss-head chunk size, the
 * device) are not part of it: a run may resume with others.
 *
 * <pre>{@code
 * RunIdentity id = RunIdentity.of(Map.of("seq", "256", "batch", "4"));
 * id.differences(other); // ["seq: 256 in the checkpoint, 128 in this run"]
 * }</pre>
 */
public final class RunIdentity {

    private final SortedMap<String, String> fields;

    private RunIdentity(SortedMap<String, String> fields) {
        this.fields = fields;
    }

    /** An identity of these fields (names and values may not be null). */
    public static RunIdentity of(Map<String, String> fields) {
        return new RunIdentity(ImmutableSortedMap.copyOf(fields));
    }

    /**
     * This identity with {@code more} fields added.
     *
     * @throws IllegalArgumentException if a field is given two different values
     */
    public RunIdentity with(Map<String, String> more) {
        ImmutableSortedMap.Builder<String, String> b = ImmutableSortedMap.naturalOrder();
        b.putAll(fields);
        for (Map.Entry<String, String> e : more.entrySet()) {
            String mine = fields.get(e.getKey());
            Preconditions.checkArgument(mine == null || mine.equals(e.getValue()),
                    "run identity field '%s' given twice: '%s' and '%s'", e.getKey(), mine, e.getValue());
            if (mine == null) {
                b.put(e.getKey(), e.getValue());
            }
        }
        return new RunIdentity(b.build());
    }

    /** The fields, sorted by name. */
    public SortedMap<String, String> fields() {
        return fields;
    }

    /** A short digest of the fields (16 hex digits of their SHA-256), the same for equal identities. */
    public String id() {
        StringBuilder canonical = new StringBuilder();
        for (Map.Entry<String, String> e : fields.entrySet()) {
            canonical.append(e.getKey().length()).append(':').append(e.getKey()).append('=')
                    .append(e.getValue().length()).append(':').append(e.getValue()).append('\n');
        }
        return sha256(canonical.toString().getBytes(StandardCharsets.UTF_8)).substring(0, 16);
    }

    /**
     * What differs between the identity {@code recorded} by a checkpoint and this run's, one line per field, such as
     * {@code "seq: 256 in the checkpoint, 128 in this run"}; empty when they are equal.
     */
    public List<String> differences(RunIdentity recorded) {
        List<String> out = new ArrayList<>();
        TreeSet<String> names = new TreeSet<>(fields.keySet());
        names.addAll(recorded.fields.keySet());
        for (String name : names) {
            String theirs = recorded.fields.get(name);
            String mine = fields.get(name);
            if (theirs == null || mine == null || !theirs.equals(mine)) {
                out.add(name + ": " + (theirs == null ? "(not recorded)" : theirs) + " in the checkpoint, "
                        + (mine == null ? "(none)" : mine) + " in this run");
            }
        }
        return out;
    }

    /** The fields as a JSON object. */
    public JsonObject toJson() {
        JsonObject o = new JsonObject();
        fields.forEach(o::addProperty);
        return o;
    }

    /**
     * Reads the fields of a JSON object of strings.
     *
     * @throws IllegalArgumentException naming {@code where} if a value is not a string
     */
    public static RunIdentity fromJson(JsonObject o, String where) {
        ImmutableSortedMap.Builder<String, String> b = ImmutableSortedMap.naturalOrder();
        for (Map.Entry<String, JsonElement> e : o.entrySet()) {
            Preconditions.checkArgument(e.getValue().isJsonPrimitive() && e.getValue().getAsJsonPrimitive().isString(),
                    "%s: identity field '%s' is not a string", where, e.getKey());
            b.put(e.getKey(), e.getValue().getAsString());
        }
        return new RunIdentity(b.build());
    }

    /**
     * A fingerprint of a model directory for an identity, cheap for any size: the SHA-256 of its {@code config.json},
     * and of each {@code .safetensors} file's name, size, first and last MiB (the header and some weights; the whole
     * weights are not read).
     *
     * @throws IOException if the directory cannot be read
     */
    public static String modelFingerprint(Path dir) throws IOException {
        MessageDigest d = digest();
        List<Path> files;
        try (Stream<Path> s = Files.list(dir)) {
            files = s.filter(p -> p.getFileName().toString().equals("config.json")
                    || p.getFileName().toString().endsWith(".safetensors")).sorted().toList();
        }
        ByteBuffer buf = ByteBuffer.allocate(1 << 20);
        for (Path f : files) {
            long size = Files.size(f);
            d.update((f.getFileName() + "\n" + size + "\n").getBytes(StandardCharsets.UTF_8));
            try (FileChannel ch = FileChannel.open(f, StandardOpenOption.READ)) {
                for (long at : new long[] {0, Math.max(0, size - buf.capacity())}) {
                    buf.clear();
                    while (buf.hasRemaining() && ch.read(buf, at + buf.position()) > 0) {
                        // reads until the buffer is full or the file ends
                    }
                    d.update(buf.flip());
                }
            }
        }
        return "sha256:" + HexFormat.of().formatHex(d.digest()).substring(0, 16) + " (" + files.size() + " files)";
    }

    /** The SHA-256 of {@code bytes} in lower-case hex. */
    static String sha256(byte[] bytes) {
        return HexFormat.of().formatHex(digest().digest(bytes));
    }

    /** A new SHA-256 digest. */
    static MessageDigest digest() {
        try {
            return MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("the JVM has no SHA-256", e);
        }
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof RunIdentity && ((RunIdentity) o).fields.equals(fields);
    }

    @Override
    public int hashCode() {
        return fields.hashCode();
    }

    @Override
    public String toString() {
        return "RunIdentity" + fields;
    }
}
