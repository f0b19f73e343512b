/**
 * Self-contained quantized artifacts: {@link ai.djl.memopt.export.QuantizedArtifact#export} writes
 * {@code model.safetensors} (packed integer data, scales, zero points, AWQ scales, compact 2:4 layers, other tensors
 * verbatim), {@code config.json} and {@code quantization.json} (format, packing order, per-layer metadata, sha256 of
 * source and artifact files), atomically; {@link ai.djl.memopt.export.QuantizedArtifact#load} and
 * {@link ai.djl.memopt.export.QuantizedArtifact#loadDeepSeek} verify and load it, reproducing the in-memory quantized
 * model exactly.
 *
 * <p>Behind that one entry point: {@code ArtifactWriter} (export), {@code ArtifactVerifier} and {@code ManifestParser}
 * (checksums and the manifest's fields), {@code ArtifactChecks} (every tensor against the block, before it changes) and
 * {@code ArtifactLoader} (changes the block).
 */
package ai.djl.memopt.export;
