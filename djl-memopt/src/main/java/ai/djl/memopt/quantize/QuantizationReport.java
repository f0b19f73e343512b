package ai.djl.memopt.quantize;

import com.google.common.collect.ImmutableList;
import com.google.common.collect.ImmutableMap;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.OptionalDouble;

/**
 * What {@link Quantizer#quantize} did: every quantized layer (Linear weights and, when asked for, embedding tables)
 * with its error and size, every skipped layer and why.
 */
public final class QuantizationReport {

    /** One quantized layer. */
    public static final class Layer {
        private final String path;
        private final QuantScheme scheme;
        private final QuantMethod method;
        private final int groupSize;
        private final long bytesBefore;
        private final long bytesAfter;
        private final double sqnrDb;
        private final Double awqAlpha;
        private final String note;
        private final boolean embedding;

        Layer(String path, QuantScheme scheme, QuantMethod method, int groupSize, long bytesBefore, long bytesAfter,
                double sqnrDb, Double awqAlpha, String note) {
            this(path, scheme, method, groupSize, bytesBefore, bytesAfter, sqnrDb, awqAlpha, note, false);
        }

        Layer(String path, QuantScheme scheme, QuantMethod method, int groupSize, long bytesBefore, long bytesAfter,
                double sqnrDb, Double awqAlpha, String note, boolean embedding) {
            this.path = path;
            this.scheme = scheme;
            this.method = method;
            this.groupSize = groupSize;
            this.bytesBefore = bytesBefore;
            this.bytesAfter = bytesAfter;
            this.sqnrDb = sqnrDb;
            this.awqAlpha = awqAlpha;
            this.note = note;
            this.embedding = embedding;
        }

        /**
         * Whether this is an embedding table ({@link QuantizedEmbedding}, rows = tokens, {@link #groupSize()} along
         * the hidden dimension) rather than a Linear weight.
         */
        public boolean embedding() {
            return embedding;
        }

        /** A remark, e.g. why AWQ fell back to RTN for this layer; empty if none. */
        public String note() {
            return note == null ? "" : note;
        }

        /** Dotted block path. */
        public String path() {
            return path;
        }

        /** Scheme. */
        public QuantScheme scheme() {
            return scheme;
        }

        /** Method actually used (RTN when AWQ had no calibration activation for this layer, see {@link #note()}). */
        public QuantMethod method() {
            return method;
        }

        /** Input weights per scale. */
        public int groupSize() {
            return groupSize;
        }

        /** Bytes of the float weight (and bias) before. */
        public long bytesBefore() {
            return bytesBefore;
        }

        /** Bytes of the quantized arrays (and bias) after. */
        public long bytesAfter() {
            return bytesAfter;
        }

        /** Signal-to-quantization-noise ratio of the effective weight, {@code 10 log10(|W|^2 / |W - W'|^2)} dB. */
        public double sqnrDb() {
            return sqnrDb;
        }

        /** The AWQ exponent chosen, if AWQ ran. */
        public OptionalDouble awqAlpha() {
            return awqAlpha == null ? OptionalDouble.empty() : OptionalDouble.of(awqAlpha);
        }
    }

    private final List<Layer> layers;
    private final Map<String, String> skipped;
    private final int calibrationPasses;

    QuantizationReport(List<Layer> layers, Map<String, String> skipped, int calibrationPasses) {
        this.layers = ImmutableList.copyOf(layers);
        this.skipped = ImmutableMap.copyOf(skipped);
        this.calibrationPasses = calibrationPasses;
    }

    /**
     * The report of two passes over the same model ({@code later} run after {@code this}, e.g. the embedding table
     * quantized after a streamed load): the layers of both, in that order; a path quantized by either pass is not
     * listed as skipped, any other keeps the first pass's reason.
     */
    public QuantizationReport combine(QuantizationReport later) {
        List<Layer> all = new java.util.ArrayList<>(layers);
        all.addAll(later.layers);
        Map<String, String> skip = new java.util.LinkedHashMap<>(skipped);
        later.skipped.forEach(skip::putIfAbsent);
        all.forEach(l -> skip.remove(l.path));
        return new QuantizationReport(all, skip, calibrationPasses + later.calibrationPasses);
    }

    /** How many times the calibration batches were run through the model (0 without AWQ). */
    public int calibrationPasses() {
        return calibrationPasses;
    }

    /** Quantized layers in tree order. */
    public List<Layer> layers() {
        return layers;
    }

    /** Layers with parameters left in full precision, path to reason. */
    public Map<String, String> skipped() {
        return skipped;
    }

    /** The entry for {@code path}, or null. */
    public Layer layer(String path) {
        return layers.stream().filter(l -> l.path.equals(path)).findFirst().orElse(null);
    }

    /** Sum of bytes before over quantized layers. */
    public long bytesBefore() {
        return layers.stream().mapToLong(Layer::bytesBefore).sum();
    }

    /** Sum of bytes after over quantized layers. */
    public long bytesAfter() {
        return layers.stream().mapToLong(Layer::bytesAfter).sum();
    }

    /** The lowest SQNR over quantized layers (NaN if none). */
    public double minSqnrDb() {
        return layers.stream().mapToDouble(Layer::sqnrDb).min().orElse(Double.NaN);
    }

    /** JSON form. */
    public JsonObject toJson() {
        JsonObject o = new JsonObject();
        JsonArray arr = new JsonArray();
        for (Layer l : layers) {
            JsonObject j = new JsonObject();
            j.addProperty("path", l.path);
            j.addProperty("kind", l.embedding ? "embedding" : "linear");
            j.addProperty("scheme", l.scheme.id());
            j.addProperty("method", l.method.id());
            j.addProperty("group_size", l.groupSize);
            j.addProperty("bytes_before", l.bytesBefore);
            j.addProperty("bytes_after", l.bytesAfter);
            j.addProperty("sqnr_db", Double.isFinite(l.sqnrDb) ? l.sqnrDb : 999.0);
            if (l.awqAlpha != null) {
                j.addProperty("awq_alpha", l.awqAlpha);
            }
            if (l.note != null) {
                j.addProperty("note", l.note);
            }
            arr.add(j);
        }
        o.add("layers", arr);
        JsonObject s = new JsonObject();
        skipped.forEach(s::addProperty);
        o.add("skipped", s);
        o.addProperty("calibration_passes", calibrationPasses);
        o.addProperty("bytes_before", bytesBefore());
        o.addProperty("bytes_after", bytesAfter());
        return o;
    }

    /** A fixed-width table. */
    @Override
    public String toString() {
        StringBuilder b = new StringBuilder();
        b.append(String.format(Locale.ROOT, "%-48s %-5s %-4s %5s %12s %12s %8s%n", "layer", "sch", "meth", "group",
                "bytes_before", "bytes_after", "sqnr_dB"));
        for (Layer l : layers) {
            b.append(String.format(Locale.ROOT, "%-48s %-5s %-4s %5d %12d %12d %8.2f%n",
                    l.embedding ? l.path + " (embedding)" : l.path, l.scheme.id(),
                    l.method.id(), l.groupSize, l.bytesBefore, l.bytesAfter, l.sqnrDb));
        }
        b.append(String.format(Locale.ROOT, "total %d -> %d bytes (%.2fx) over %d layers%n", bytesBefore(),
                bytesAfter(), bytesAfter() == 0 ? 0.0 : (double) bytesBefore() / bytesAfter(), layers.size()));
        layers.stream().filter(l -> l.note != null)
                .forEach(l -> b.append("note ").append(l.path).append(": ").append(l.note).append('\n'));
        skipped.forEach((k, v) -> b.append("skipped ").append(k).append(": ").append(v).append('\n'));
        return b.toString();
    }

    /** Pretty JSON. */
    public String toJsonString() {
        return new GsonBuilder().setPrettyPrinting().disableHtmlEscaping().create().toJson(toJson());
    }
}
