/**
 * DeepSeek-V3 and DeepSeek-V2 causal language models as DJL blocks, numerically matching Hugging Face transformers
 * (5.17, eager attention) and loading its checkpoints directly.
 *
 * <ul>
 *   <li>{@link ai.djl.memopt.model.deepseek.DeepSeekConfig}: {@code config.json} (V3/V2), presets, validation.
 *   <li>{@link ai.djl.memopt.model.deepseek.DeepSeekForCausalLM} -> {@link ai.djl.memopt.model.deepseek.DeepSeekModel}
 *       -> {@link ai.djl.memopt.model.deepseek.DeepSeekDecoderLayer} ({@link
 *       ai.djl.memopt.model.deepseek.MultiHeadLatentAttention}, {@link ai.djl.memopt.model.deepseek.DeepSeekMoE} /
 *       {@link ai.djl.memopt.model.deepseek.DeepSeekMlp}, {@link ai.djl.memopt.model.deepseek.RmsNorm}), with the
 *       block tree named like the Hugging Face modules so {@code BlockTrees.parameters(model)} keys are the checkpoint
 *       tensor names.
 *   <li>{@link ai.djl.memopt.model.deepseek.DeepSeekLoader} / {@link
 *       ai.djl.memopt.model.deepseek.DeepSeekCheckpointWriter}: Hugging Face safetensors in and out.
 *   <li>{@link ai.djl.memopt.model.deepseek.CausalLmLoss}: next-token cross-entropy.
 * </ul>
 *
 * <p>Every projection is a bias-free DJL {@code Linear} held in a {@code Block} field and called through it, so
 * decorators (checkpointing, precision, quantization, LoRA) replace them with {@code BlockTrees.replace}. Temporaries of
 * each forward are closed as soon as the block returns (an {@code NDScope} per block); only outputs survive.
 */
package ai.djl.memopt.model.deepseek;
