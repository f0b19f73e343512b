package ai.djl.memopt.export;

import static ai.djl.memopt.export.QuantizedArtifact.METADATA;
import static ai.djl.memopt.export.QuantizedArtifact.WEIGHTS;
import static ai.djl.memopt.export.QuantizedArtifact.sha256;

import ai.djl.memopt.safetensors.HfCheckpoint;
import ai.djl.memopt.safetensors.RegularFiles;
import ai.djl.memopt.safetensors.StrictJson;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;

/** Verifies a {@link QuantizedArtifact}: its {@code quantization.json} parses, and every listed file has its sha256. */
final class ArtifactVerifier {

    private ArtifactVerifier() {}

    /** {@link QuantizedArtifact#verify}. */
    static ArtifactManifest verify(Path dir) throws IOException {
        ArtifactManifest manifest = readManifest(dir);
        Path metaFile = dir.resolve(METADATA);
        if (!manifest.files().containsKey(WEIGHTS) && !manifest.files().containsKey(HfCheckpoint.INDEX_FILE)) {
            throw new QuantizedArtifactException(metaFile + ": 'files' lists neither " + WEIGHTS + " nor "
                    + HfCheckpoint.INDEX_FILE);
        }
        for (Map.Entry<String, String> f : manifest.files().entrySet()) {
            if (f.getKey().contains("/") || f.getKey().contains("\\") || f.getKey().startsWith(".")) {
                throw new QuantizedArtifactException(metaFile + ": file name '" + f.getKey()
                        + "' must be a plain name inside the artifact directory");
            }
            Path p = dir.resolve(f.getKey());
            if (!Files.exists(p)) {
                throw new QuantizedArtifactException(dir + ": missing file " + f.getKey() + " listed in " + METADATA);
            }
            RegularFiles.require(p, "artifact file");
            String actual = sha256(p);
            if (!actual.equals(f.getValue())) {
                throw new QuantizedArtifactException(p + ": sha256 mismatch (file corrupt or replaced): expected "
                        + f.getValue() + ", got " + actual);
            }
        }
        return manifest;
    }

    /**
     * The parsed {@code quantization.json} of {@code dir}, every field checked but no checksum computed (strict JSON:
     * a key given twice is an error, not "the last one wins").
     */
    static ArtifactManifest readManifest(Path dir) throws IOException {
        Path metaFile = dir.resolve(METADATA);
        if (!Files.exists(metaFile)) {
            throw new QuantizedArtifactException(dir + ": missing " + METADATA
                    + " (not a quantized artifact, or its export did not finish)");
        }
        RegularFiles.require(metaFile, METADATA);
        JsonObject meta;
        try {
            JsonElement e = StrictJson.parse(Files.readString(metaFile, StandardCharsets.UTF_8));
            if (!e.isJsonObject()) {
                throw new QuantizedArtifactException(metaFile + ": not a JSON object");
            }
            meta = e.getAsJsonObject();
        } catch (JsonParseException e) {
            throw new QuantizedArtifactException(metaFile + ": invalid JSON: " + e.getMessage(), e);
        }
        return ManifestParser.parse(dir, meta);
    }
}
