package ai.djl.memopt.examples.guide;

import ai.djl.memopt.export.ArtifactManifest;
import ai.djl.memopt.export.ExportOptions;
import ai.djl.memopt.export.QuantizedArtifact;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import java.io.IOException;
import java.nio.file.Path;
import java.util.function.Supplier;

/** The guide's export-and-load snippet. */
public final class ExportSnippet {

    private ExportSnippet() {}

    // guide:begin
    /** Quantizes and exports a trained model, then loads the artifact onto a freshly built one, as a server would. */
    public static Block exportAndLoad(Block trained, Supplier<Block> architecture, Shape inputShape, Path dir,
            NDManager manager) throws IOException {
        Quantizer.quantize(trained, Int8WeightOnlyConfig.builder().build());
        QuantizedArtifact.export(trained, dir, ExportOptions.builder().optArchitecture("user-model").build());

        // in the serving program: build the same architecture, initialize it (any weights), load
        Block fresh = architecture.get();
        fresh.initialize(manager, DataType.FLOAT32, inputShape);
        ArtifactManifest manifest = QuantizedArtifact.load(dir, fresh); // checksums, then every tensor's type and shape
        System.out.println(manifest.layers().size() + " quantized layers loaded");
        return fresh;
    }
    // guide:end
}
