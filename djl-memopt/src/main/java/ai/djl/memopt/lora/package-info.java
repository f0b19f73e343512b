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
 *   <li>{@link ai.djl.memopt.lora.LoraConfig}: rank, alpha, dropout, rsLoRA and PEFT-style {@code target_modules} /
 *       {@code exclude_modules}; routed MoE experts opt-in.</li>
 *   <li>{@link ai.djl.memopt.lora.PeftAdapters}: {@code adapter_model.safetensors} + {@code adapter_config.json} as
 *       PEFT reads and writes them (tensor names {@code base_model.model.<module>.lora_A.weight}).</li>
 * </ul>
 *
 * <p>Training only needs DJL's own machinery: frozen parameters ({@code Parameter.requiresGradient() == false}) get no
 * gradient and DJL's {@code ParameterStore.updateAllParameters} skips them, so a plain {@code Trainer} updates only the
 * adapters.
 */
package ai.djl.memopt.lora;
