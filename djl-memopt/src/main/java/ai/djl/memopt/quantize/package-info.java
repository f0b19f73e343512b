/**
 * Weight-only quantization and magnitude pruning of the {@link ai.djl.nn.core.Linear} layers of any DJL block tree (and,
 * on request, of its embedding tables).
 *
 * <p>One entry point, in the spirit of torchao's {@code quantize_(model, config)}:
 *
 * <pre>{@code
 * QuantizationReport report = Quantizer.quantize(model, Int4WeightOnlyConfig.builder()
 *         .optGroupSize(128)                                   // 32 | 64 | 128
 *         .optMethod(QuantMethod.AWQ)                          // or RTN (default)
 *         .optCalibration(Calibration.of(batches))             // AWQ: inputs fed to model.forward
 *         .addOverride(LayerOverride.skip("model.layers.0.**")) // per-layer: skip or another config
 *         .build());
 * PruningReport pruned = Pruner.prune(model, PruningConfig.twoFour()); // prune before quantizing
 * }</pre>
 *
 * <ul>
 *   <li>{@link ai.djl.memopt.quantize.Int8WeightOnlyConfig}: symmetric int8, one scale per output channel.
 *   <li>{@link ai.djl.memopt.quantize.Int4WeightOnlyConfig}: asymmetric uint4 with a zero point per group along the
 *       input dimension, packed two per byte ({@link ai.djl.memopt.quantize.Int4Packing}).
 *   <li>{@link ai.djl.memopt.quantize.QuantizedLinear} replaces each selected Linear and dequantizes just in time in a
 *       scoped sub-manager at every forward, in the input's type.
 *   <li>{@link ai.djl.memopt.quantize.LayerFilter#defaults()} keeps embeddings, norms, the MoE router and
 *       {@code lm_head} in full precision.
 *   <li>{@link ai.djl.memopt.quantize.QuantizedEmbedding}: opt-in ({@code optIncludeEmbeddings(true)} or a
 *       {@link ai.djl.memopt.quantize.LayerOverride} naming the table) quantized embedding table, int8 per row or int4
 *       group-wise along the hidden size; a lookup dequantizes only the requested rows.
 * </ul>
 *
 * Save the result with {@link ai.djl.memopt.export.QuantizedArtifact}.
 */
package ai.djl.memopt.quantize;
