/**
 * Self-contained quantized artifacts: {@link ai.djl.memopt.export.QuantizedArtifact#export} writes
 * {@code model.safetensors} (packed integer data, scales, zero points, AWQ scales, compact 2:4 layers, other tensors
 * verbatim), {@code config.json} and {@code quantization.json} (format, packing order, per-layer metadata, sha256 of
 * source and artifact files), atomically; {@link ai.djl.memopt.export.QuantizedArtifact#load} and
 * {@link ai.djl.memopt.export.QuantizedArtifact#loadDeepSeek} verify and load it, reproducing the in-memory quantized
 * model exactly.
 */
package ai.djl.memopt.export;
