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
 *
 * @param layers quantized layers in tree order
 * @param skipped layers with parameters left in full precision, path to reason
 * @param calibrationPasses how many times the calibration batches were run through the model (0 without AWQ)
 */
public record QuantizationReport(List<Layer> layers, Map<String, String> skipped, int calibrationPasses) {

    /**
     * One quantized layer.
     *
     * @param path dotted block path
     * @param scheme scheme
     * @param method method actually used (RTN when AWQ had no calibration activation for this layer, see
     *     {@link #note()})
     * @param groupSize input weights per scale
     * @param bytesBefore bytes of the float weight (and bias) before
     * @param bytesAfter bytes of the quantized arrays (and bias) after
     * @param sqnrDb signal-to-quantization-noise ratio of the effective weight,
     *     {@code 10 log10(|W|^2 / |W - W'|^2)} dB
     * @param awqAlpha the AWQ exponent chosen, if AWQ ran
     * @param note a remark, e.g. why AWQ fell back to RTN for this layer; null or empty if none
     * @param embedding whether this is an embedding table ({@link QuantizedEmbedding}, rows = tokens,
     *     {@link #groupSize()} along the hidden dimension) rather than a Linear weight
     */
    public record Layer(String path, QuantScheme scheme, QuantMethod method, int groupSize, long bytesBefore,
            long bytesAfter, double sqnrDb, OptionalDouble awqAlpha, String note, boolean embedding) {

        /** Takes a null {@code awqAlpha} for "AWQ did not run". */
        public Layer {
            awqAlpha = awqAlpha == null ? OptionalDouble.empty() : awqAlpha;
        }

        /** A Linear weight's entry; {@code awqAlpha} null when AWQ did not run. */
        Layer(String path, QuantScheme scheme, QuantMethod method, int groupSize, long bytesBefore, long bytesAfter,
                double sqnrDb, Double awqAlpha, String note) {
            this(path, scheme, method, groupSize, bytesBefore, bytesAfter, sqnrDb,
                    awqAlpha == null ? OptionalDouble.empty() : OptionalDouble.of(awqAlpha), note, false);
        }

        /** A remark, e.g. why AWQ fell back to RTN for this layer; empty if none. */
        @Override
        public String note() {
            return note == null ? "" : note;
        }
    }

    /** Copies the list and map into immutable ones. */
    public QuantizationReport {
        layers = ImmutableList.copyOf(layers);
        skipped = ImmutableMap.copyOf(skipped);
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
            if (l.awqAlpha.isPresent()) {
                j.addProperty("awq_alpha", l.awqAlpha.getAsDouble());
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
