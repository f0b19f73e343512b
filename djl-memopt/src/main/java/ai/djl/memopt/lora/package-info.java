/**
 * LoRA adapters for any DJL block tree with weight matrices, in Hugging Face PEFT's layout.
 *
 * <ul>
 *   <li>{@link ai.djl.memopt.lora.LoraLinear}: {@code y = base(x) + (alpha / r) (x A^T) B^T} around a DJL
 *       {@code Linear} or any {@link ai.djl.memopt.nn.LinearWeightSource} (a quantized projection: QLoRA). PEFT's
 *       initialisation (A kaiming-uniform, B zero: the model is unchanged until trained) and module names
 *       ({@code base_layer}, {@code lora_A}, {@code lora_B}).</li>
 *   <li>{@link ai.djl.memopt.lora.Lora}: {@code apply} (wrap the targeted projections, freeze everything else),
 *       {@code merge} (fold {@code scale * B A} into the weights), {@code unload}, {@code save} / {@code load}.</li>
 *   <li>{@link ai.djl.memopt.lora.LoraConfig}: rank, alpha, dropout, rsLoRA and PEFT's {@code target_modules},
 *       {@code exclude_modules}, {@code target_parameters}, {@code rank_pattern} and {@code alpha_pattern}, with the
 *       meaning PEFT 0.21 gives them on transformers 5 ({@code LoraTargets}): on a MoE model the names
 *       {@code gate_proj}, {@code up_proj}, {@code down_proj} mean the fused routed experts.</li>
 *   <li>{@link ai.djl.memopt.lora.PeftAdapters}: {@code adapter_model.safetensors} + {@code adapter_config.json} as
 *       PEFT reads and writes them (tensor names {@code base_model.model.<module>.lora_A.weight}; routed experts in
 *       PEFT's fused-parameter form, {@code PeftLayout} and {@code FusedExperts}, mapped exactly onto the per-expert
 *       projections).</li>
 * </ul>
 *
 * <p>Training only needs DJL's own machinery: frozen parameters ({@code Parameter.requiresGradient() == false}) get no
 * gradient and DJL's {@code ParameterStore.updateAllParameters} skips them, so a plain {@code Trainer} updates only the
 * adapters.
 */
package ai.djl.memopt.lora;
