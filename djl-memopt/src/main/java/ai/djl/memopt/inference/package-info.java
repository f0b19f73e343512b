/**
 * Text generation for DeepSeek-V2/V3 (and any causal LM block) with DJL.
 *
 * <ul>
 *   <li>{@link ai.djl.memopt.inference.TextTokenizer}: a model directory's {@code tokenizer.json} through DJL's
 *       Hugging Face tokenizers (CPU native library from the jar, offline; no 512-token truncation), with BOS/EOS and
 *       the chat template from {@code tokenizer_config.json} ({@link ai.djl.memopt.inference.ChatTemplate}, Jinjava).
 *   <li>{@link ai.djl.memopt.inference.SamplingParams} and {@link ai.djl.memopt.inference.LogitsSampler}: greedy,
 *       temperature, top-k, top-p on the device; seeded, reproducible sampling.
 *   <li>{@link ai.djl.memopt.inference.Generator}: the decoding loop over a
 *       {@link ai.djl.memopt.inference.LanguageModel} (left-padded batches, EOS, stop strings, streaming, cancel).
 *   <li>{@link ai.djl.memopt.inference.MlaCachedDecoder}: DeepSeek decoding with the compressed MLA cache
 *       ({@code kv_lora_rank + qk_rope_head_dim} values per token and layer) and absorbed {@code kv_b_proj}; routed
 *       experts gathered on the device without reading their ids back ({@link ai.djl.memopt.inference.ExpertDispatch},
 *       the default on a GPU), so a decode step's only device-to-host copy is the sampled ids;
 *       {@link ai.djl.memopt.inference.RecomputingLanguageModel}: no cache, the reference.
 *   <li>{@link ai.djl.memopt.inference.GenerationTranslator}: generation through a DJL {@code Predictor};
 *       {@link ai.djl.memopt.inference.GenerationModel}: a checkpoint directory opened for generation;
 *       {@code ai.djl.memopt.inference.server}: the OpenAI-compatible HTTP server.
 * </ul>
 *
 * <pre>{@code
 * try (GenerationModel m = GenerationModel.open(dir, Device.cpu(), DataType.FLOAT32)) {
 *     TextTokenizer tok = m.tokenizer().orElseThrow();
 *     long[] prompt = tok.encodeChat(List.of(ChatMessage.user("Hello!")), true);
 *     GenerationResult r = m.generator().generate(prompt, SamplingParams.builder().setMaxNewTokens(64)
 *             .optTemperature(0.7f).optTopP(0.95f).optSeed(1).build());
 *     System.out.println(r.text());
 * }
 * }</pre>
 */
package ai.djl.memopt.inference;
