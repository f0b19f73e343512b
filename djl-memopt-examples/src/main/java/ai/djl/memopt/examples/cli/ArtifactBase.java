package ai.djl.memopt.examples.cli;

import ai.djl.memopt.export.ModelDirectories;
import ai.djl.memopt.export.QuantizedArtifact;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Set;
import java.util.TreeSet;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * {@code memopt finetune --model ART}: QLoRA on a quantized artifact. Its quantized layers stay as they are, LoRA
 * adapters train beside them, and the adapter is saved in PEFT's layout; what cannot work on an artifact is refused in
 * one line, before any work.
 */
final class ArtifactBase {

    private ArtifactBase() {}

    /**
     * Rejects the options an artifact cannot take: full fine-tuning (its packed layers have no float weights to
     * train), quantizing it again, and {@code --merge} (an adapter merged into dequantized layers would be a float
     * model larger than the artifact's source).
     */
    static void check(Path model, int loraRank, String quantizeBase, boolean merge) {
        if (model == null || !ModelDirectories.isQuantizedArtifact(model)) {
            return;
        }
        if (loraRank == 0) {
            throw new IllegalArgumentException(model + " is a quantized artifact: its layers train through LoRA"
                    + " adapters (QLoRA), so give --lora-rank R (or fine-tune the model it was quantized from)");
        }
        if (quantizeBase != null) {
            throw new IllegalArgumentException(model + " is already quantized (" + schemes(model)
                    + "): drop --quantize-base");
        }
        if (merge) {
            throw new IllegalArgumentException("--merge with a quantized artifact: run the adapter on it instead"
                    + " (memopt generate --model " + model + " --adapter OUT), or fine-tune the source model to merge");
        }
    }

    /** {@code " over the quantized artifact's int4 layers"} for an artifact, else empty. */
    static String describe(Path model) {
        if (model == null || !ModelDirectories.isQuantizedArtifact(model)) {
            return "";
        }
        return " over the quantized artifact's " + schemes(model) + " layers";
    }

    /** The schemes named in the artifact's {@code quantization.json} (read without hashing the weights). */
    private static String schemes(Path artifact) {
        try {
            Set<String> schemes = new TreeSet<>();
            Matcher m = SCHEME.matcher(Files.readString(artifact.resolve(QuantizedArtifact.METADATA)));
            while (m.find()) {
                schemes.add(m.group(1));
            }
            return schemes.isEmpty() ? "quantized" : String.join("/", schemes);
        } catch (IOException e) {
            return "quantized";
        }
    }

    private static final Pattern SCHEME = Pattern.compile("\"scheme\"\\s*:\\s*\"([a-z0-9]+)\"");
}
