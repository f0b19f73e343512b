package ai.djl.memopt.export;

import static ai.djl.memopt.export.QuantizedArtifact.EMBEDDINGS_VERSION;
import static ai.djl.memopt.export.QuantizedArtifact.FORMAT;
import static ai.djl.memopt.export.QuantizedArtifact.FORMAT_VERSION;
import static ai.djl.memopt.export.QuantizedArtifact.METADATA;
import static ai.djl.memopt.export.QuantizedArtifact.MIN_FORMAT_VERSION;

import ai.djl.memopt.quantize.QuantMethod;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.ndarray.types.Shape;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;

/** Reads the fields of {@code quantization.json} into an {@link ArtifactManifest}, naming the file and field at fault. */
final class ManifestParser {

    private ManifestParser() {}

    /** The manifest of artifact {@code dir} from its parsed {@code quantization.json}, every field checked. */
    static ArtifactManifest parse(Path dir, JsonObject meta) throws QuantizedArtifactException {
        String where = dir.resolve(METADATA).toString();
        String format = string(meta, "format", where);
        if (!FORMAT.equals(format)) {
            throw new QuantizedArtifactException(where + ": format is '" + format + "', expected '" + FORMAT + "'");
        }
        int version = integer(meta, "format_version", where);
        if (version < MIN_FORMAT_VERSION || version > FORMAT_VERSION) {
            throw new QuantizedArtifactException(where + ": unsupported format_version " + version
                    + " (this library reads versions " + MIN_FORMAT_VERSION + " to " + FORMAT_VERSION + ")");
        }
        Map<String, ArtifactManifest.LayerEntry> layers = new LinkedHashMap<>();
        for (Map.Entry<String, JsonElement> e : object(meta, "layers", where).entrySet()) {
            String lw = where + " layer '" + e.getKey() + "'";
            if (!e.getValue().isJsonObject()) {
                throw new QuantizedArtifactException(lw + ": not an object");
            }
            JsonObject l = e.getValue().getAsJsonObject();
            QuantScheme scheme;
            String schemeId = string(l, "scheme", lw);
            try {
                scheme = QuantScheme.fromId(schemeId);
            } catch (IllegalArgumentException ex) {
                throw new QuantizedArtifactException(lw + ": " + ex.getMessage(), ex);
            }
            Shape shape = shape(l, lw);
            int group = integer(l, "group_size", lw);
            if (group <= 0 || (scheme == QuantScheme.INT8_WEIGHT_ONLY && shape.get(1) % group != 0)) {
                throw new QuantizedArtifactException(lw + ": bad group_size " + group);
            }
            String method = string(l, "method", lw);
            QuantMethod quantMethod;
            try {
                quantMethod = QuantMethod.fromId(method);
            } catch (IllegalArgumentException ex) {
                throw new QuantizedArtifactException(lw + ": " + ex.getMessage(), ex);
            }
            String dtype = string(l, "weight_dtype", lw);
            if (!dtype.equals("float32") && !dtype.equals("float16")) {
                throw new QuantizedArtifactException(lw + ": weight_dtype must be float32 or float16, got " + dtype);
            }
            layers.put(e.getKey(), new ArtifactManifest.LayerEntry(scheme, group, method, shape, dtype,
                    bool(l, "input_scales", lw), bool(l, "bias", lw)));
        }
        Map<String, Shape> sparse = new LinkedHashMap<>();
        if (meta.has("sparse24")) {
            for (Map.Entry<String, JsonElement> e : object(meta, "sparse24", where).entrySet()) {
                String lw = where + " sparse24 '" + e.getKey() + "'";
                Shape s = shape(e.getValue().getAsJsonObject(), lw);
                if (s.get(1) % 8 != 0) {
                    throw new QuantizedArtifactException(lw + ": input dimension must be a multiple of 8, got " + s);
                }
                sparse.put(e.getKey(), s);
            }
        }
        Map<String, ArtifactManifest.EmbeddingEntry> embeddings = new LinkedHashMap<>();
        if (meta.has("embeddings")) {
            if (version < EMBEDDINGS_VERSION) {
                throw new QuantizedArtifactException(where + ": 'embeddings' needs format_version "
                        + EMBEDDINGS_VERSION + " or later, the file says " + version);
            }
            for (Map.Entry<String, JsonElement> e : object(meta, "embeddings", where).entrySet()) {
                String lw = where + " embedding '" + e.getKey() + "'";
                if (!e.getValue().isJsonObject()) {
                    throw new QuantizedArtifactException(lw + ": not an object");
                }
                JsonObject l = e.getValue().getAsJsonObject();
                QuantScheme scheme;
                try {
                    scheme = QuantScheme.fromId(string(l, "scheme", lw));
                } catch (IllegalArgumentException ex) {
                    throw new QuantizedArtifactException(lw + ": " + ex.getMessage(), ex);
                }
                Shape shape = shape(l, lw);
                int group = integer(l, "group_size", lw);
                boolean groupOk = scheme == QuantScheme.INT8_WEIGHT_ONLY ? group > 0 && shape.get(1) % group == 0
                        : (group == 32 || group == 64 || group == 128) && shape.get(1) % group == 0;
                if (!groupOk) {
                    throw new QuantizedArtifactException(lw + ": bad group_size " + group + " for " + scheme.id()
                            + " and hidden size " + shape.get(1));
                }
                String dtype = string(l, "weight_dtype", lw);
                if (!dtype.equals("float32") && !dtype.equals("float16")) {
                    throw new QuantizedArtifactException(lw + ": weight_dtype must be float32 or float16, got "
                            + dtype);
                }
                String parameter = string(l, "parameter", lw);
                if (parameter.isEmpty() || parameter.contains(".")) {
                    throw new QuantizedArtifactException(lw + ": parameter must be a plain name, got '" + parameter
                            + "'");
                }
                if (layers.containsKey(e.getKey())) {
                    throw new QuantizedArtifactException(lw + ": also listed under 'layers'");
                }
                embeddings.put(e.getKey(), new ArtifactManifest.EmbeddingEntry(scheme, group, shape, dtype, parameter));
            }
        }
        Map<String, String> files = strings(object(meta, "files", where), where + " files");
        Map<String, String> sources =
                meta.has("source_files") ? strings(object(meta, "source_files", where), where) : Map.of();
        return new ArtifactManifest(version, string(meta, "library_version", where), string(meta, "architecture", where),
                layers, sparse, embeddings, files, sources);
    }

    private static JsonElement field(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = o.get(name);
        if (e == null || e.isJsonNull()) {
            throw new QuantizedArtifactException(where + ": missing field '" + name + "'");
        }
        return e;
    }

    private static String string(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = field(o, name, where);
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isString()) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be a string, got " + e);
        }
        return e.getAsString();
    }

    private static int integer(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = field(o, name, where);
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isNumber()) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be an integer, got " + e);
        }
        double d = e.getAsDouble();
        if (d != Math.rint(d) || Math.abs(d) > Integer.MAX_VALUE) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be an integer, got " + e);
        }
        return (int) d;
    }

    private static boolean bool(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = field(o, name, where);
        if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isBoolean()) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be true or false, got " + e);
        }
        return e.getAsBoolean();
    }

    private static JsonObject object(JsonObject o, String name, String where) throws QuantizedArtifactException {
        JsonElement e = field(o, name, where);
        if (!e.isJsonObject()) {
            throw new QuantizedArtifactException(where + ": field '" + name + "' must be an object");
        }
        return e.getAsJsonObject();
    }

    private static Map<String, String> strings(JsonObject o, String where) throws QuantizedArtifactException {
        Map<String, String> out = new LinkedHashMap<>();
        for (Map.Entry<String, JsonElement> e : o.entrySet()) {
            out.put(e.getKey(), string(o, e.getKey(), where));
        }
        return out;
    }

    private static Shape shape(JsonObject l, String where) throws QuantizedArtifactException {
        JsonElement e = field(l, "shape", where);
        if (!e.isJsonArray() || e.getAsJsonArray().size() != 2) {
            throw new QuantizedArtifactException(where + ": shape must be [out, in], got " + e);
        }
        long[] dims = new long[2];
        for (int i = 0; i < 2; i++) {
            JsonElement d = e.getAsJsonArray().get(i);
            if (!d.isJsonPrimitive() || !d.getAsJsonPrimitive().isNumber() || d.getAsLong() <= 0) {
                throw new QuantizedArtifactException(where + ": shape must be positive integers, got " + e);
            }
            dims[i] = d.getAsLong();
        }
        return new Shape(dims);
    }
}
