package ai.djl.memopt.inference;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.ScriptEmitter;
import java.util.List;

/**
 * The TorchScript source of one stage's decode step (see {@link ScriptedStage}): the same operations, in the same
 * order and types, as the Java path ({@code DecoderStage.Cache.forward/attend}, {@code GatheredExperts}, and through
 * {@link ScriptEmitter}, shared with the training layer script, {@code RmsNorm}, {@code RotaryEmbedding},
 * {@code MoeGate}, the sorted dispatch, {@code DeepSeekMoE.combine}), with the config's sizes and constants written into
 * the code. Dtypes are TorchScript's integers: 4 is INT64, 6 FP32.
 *
 * <p>{@code forward(x, positions, attention_mask, fixed, w, latent, rope_key, wuk, wuvt, chunks)}: {@code x} is the
 * token ids {@code (B, T)} or the hidden state (see {@link Ends}); the step's lengths come from the shapes
 * ({@code total} = the mask's columns, {@code length = total - T}); the rotary cos/sin ({@code RotaryEmbedding.cosSin})
 * and the additive mask ({@code DecoderStage.Cache.additiveMask}) are computed from the position ids and the 0/1 mask.
 *
 * <p>The weights come as one flat {@code List[Tensor]}, per layer in this order (offsets written into the code): input
 * norm; {@code q_a_proj, q_a_layernorm, q_b_proj} or {@code q_proj}; {@code kv_a_proj_with_mqa, kv_a_layernorm,
 * o_proj}; post-attention norm; then a dense MLP's {@code gate, up, down}, or the router's weight (V3: and
 * {@code e_score_correction_bias}), the expert stacks {@code gate, up, down} and, with shared experts, their
 * {@code gate, up, down}.
 */
final class ScriptedStepSource {

    static final String CLASS = "DecodeStep";

    private final DeepSeekConfig config;
    private final StringBuilder out = new StringBuilder();
    private final ScriptEmitter emit;

    private ScriptedStepSource(DeepSeekConfig config) {
        this.config = config;
        this.emit = new ScriptEmitter(config, CLASS, out);
    }

    /** Weight slots of a layer's attention part, norms included. */
    static int attentionSlots(DeepSeekConfig config) {
        return config.qLoraRank().isPresent() ? 8 : 6;
    }

    /** Weight slots of a layer's MLP part. */
    static int mlpSlots(DeepSeekConfig config, boolean moe) {
        if (!moe) {
            return 3;
        }
        return 1 + (config.isV3() ? 1 : 0) + 3 + (config.nSharedExperts() > 0 ? 3 : 0);
    }

    /**
     * The class body for a stage whose layers are MoE ({@code true}) or dense ({@code false}) in order.
     *
     * @param moe per layer of the stage
     * @param ends what the call does besides the layers
     */
    static String classBody(DeepSeekConfig config, List<Boolean> moe, Ends ends) {
        ScriptedStepSource s = new ScriptedStepSource(config);
        s.forward(moe, ends);
        s.emit.rms();
        s.emit.rope();
        s.emit.cosSin();
        s.mask();
        s.attention();
        s.emit.mlp();
        if (moe.contains(true)) {
            s.moe();
        }
        return s.out.toString();
    }

    /**
     * What a stage's call does around its layers. The step's rotary cos/sin and additive mask are always computed
     * inside, from the position ids and the 0/1 attention mask.
     *
     * @param embed the call takes token ids {@code (B, T)} and looks them up in the embedding table (the first stage),
     *     else it takes the hidden state {@code (B, T, hidden)}
     * @param head the call ends with the final norm and the head on the last position and returns FP32 logits
     *     {@code (B, V)}, else the hidden state {@code (B, T, hidden)}
     * @param tied the head is the embedding table ({@code tie_word_embeddings}) instead of {@code lm_head}
     */
    record Ends(boolean embed, boolean head, boolean tied) {

        /** Layers only: hidden state in and out. */
        static final Ends NONE = new Ends(false, false, false);

        /**
         * The session's fixed tensors the call takes before the weights, in order: the inverse frequencies, the padding
         * bias, then the embedding table (with {@code embed}), then the final norm's weight and the head's (with
         * {@code head}; the embedding table when tied).
         */
        int fixedSlots() {
            return 2 + (embed ? 1 : 0) + (head ? 2 : 0);
        }
    }

    private void line(String format, Object... args) {
        emit.line(format, args);
    }

    private String self() {
        return emit.self();
    }

    private static String f32(double value) {
        return ScriptEmitter.f32(value);
    }

    private void forward(List<Boolean> moe, Ends ends) {
        // the fixed list: inv_freq, padding, [embedding table], [final norm, head]
        line("  def forward(%s, x: Tensor, positions: Tensor, attention_mask: Tensor, fixed: List[Tensor],"
                + " w: List[Tensor], latent: List[Tensor], rope_key: List[Tensor], wuk: List[Tensor],"
                + " wuvt: List[Tensor], chunks: List[int]) -> Tensor:", self());
        line("    b = positions.size(0)");
        line("    t = positions.size(1)");
        line("    total = attention_mask.size(1)");
        line("    length = total - t");
        line("    cos, sin = self.cos_sin(positions, fixed[0])");
        line("    mask = self.mask(attention_mask, fixed[1], b, t, length, total)");
        // the embedding lookup: DJL's advanced indexing of the table by the ids, the same gather
        line(ends.embed() ? "    h = fixed[2][x]" : "    h = x");
        int o = 0;
        int att = attentionSlots(config);
        for (int i = 0; i < moe.size(); i++) {
            line("    a = torch.add(h, self.attn(self.rms(h, w[%d]), cos, sin, mask, w, %d, latent[%d], rope_key[%d],"
                    + " wuk[%d], wuvt[%d], length, total))", o, o, i, i, i, i);
            int p = o + att - 1; // post-attention norm
            if (moe.get(i)) {
                line("    h = torch.add(a, self.moe(self.rms(a, w[%d]), w, %d, chunks[%d]))", p, p + 1, i);
            } else {
                line("    h = torch.add(a, self.mlp(self.rms(a, w[%d]), w[%d], w[%d], w[%d]))", p, p + 1, p + 2, p + 3);
            }
            o += att + mlpSlots(config, moe.get(i));
        }
        if (!ends.head()) {
            line("    return h");
            return;
        }
        int n = ends.embed() ? 3 : 2;
        // only the last position's logits, as the Java path: norm, then lm_head (or the tied table), in FP32
        line("    normed = self.rms(h[:, -1:, :], fixed[%d])", n);
        if (ends.tied()) {
            line("    logits = torch.matmul(normed, torch.t(fixed[%d]))", n + 1);
        } else {
            line("    logits = torch.linear(normed, fixed[%d])", n + 1);
        }
        line("    return torch.reshape(logits.to(6), [b, %d])", config.vocabSize());
    }

    /**
     * {@code mask(attention_mask (B, total) 0/1, padding (B, 1, 1, maxLength) FP32, ...) -> (B, 1, T, S)}:
     * {@code DecoderStage.Cache.additiveMask}, writing the new columns' padding bias in place.
     */
    private void mask() {
        String lowest = Double.toString(-Float.MAX_VALUE);
        line("  def mask(%s, attention_mask: Tensor, padding: Tensor, b: int, t: int, length: int, total: int)"
                + " -> Tensor:", self());
        line("    fresh = torch.eq(attention_mask[:, length:], 0).to(6)");
        line("    padding[:, :, :, length:total] = torch.reshape(torch.mul(fresh, %s), [b, 1, 1, t])", lowest);
        line("    past = padding[:, :, :, :total]");
        line("    if t == 1:");
        line("      return past");
        line("    d = padding.device");
        line("    q = torch.reshape(torch.arange(length, total, dtype=4, device=d), [t, 1])");
        line("    k = torch.reshape(torch.arange(0, total, dtype=4, device=d), [1, total])");
        line("    causal = torch.where(torch.ge(q, k), torch.zeros([t, total], dtype=6, device=d),"
                + " torch.full([t, total], %s, dtype=6, device=d))", lowest);
        // min, as adding would overflow to -inf
        line("    return torch.minimum(torch.reshape(causal, [1, 1, t, total]), past)");
    }

    private void attention() {
        int h = config.numAttentionHeads();
        int nope = config.qkNopeHeadDim();
        int rope = config.qkRopeHeadDim();
        int r = config.kvLoraRank();
        int v = config.vHeadDim();
        boolean lora = config.qLoraRank().isPresent();
        line("  def attn(%s, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, w: List[Tensor], o: int,"
                + " latent: Tensor, rope_key: Tensor, wuk: Tensor, wuvt: Tensor, length: int, total: int) -> Tensor:",
                self());
        line("    b = x.size(0)");
        line("    t = x.size(1)");
        if (lora) {
            line("    q = torch.linear(self.rms(torch.linear(x, w[o + 1]), w[o + 2]), w[o + 3])");
            line("    kv = o + 4");
        } else {
            line("    q = torch.linear(x, w[o + 1])");
            line("    kv = o + 2");
        }
        line("    q = torch.transpose(torch.reshape(q, [b, t, %d, %d]), 1, 2)", h, nope + rope);
        line("    q_pe = self.rope(q[:, :, :, %d:], cos, sin)", nope);
        line("    compressed = torch.linear(x, w[kv])");
        line("    c = self.rms(compressed[:, :, :%d], w[kv + 1])", r);
        line("    k_pe = self.rope(torch.reshape(compressed[:, :, %d:], [b, 1, t, %d]), cos, sin)", r, rope);
        // in place: the cache is never re-concatenated
        line("    latent[:, length:total] = c.to(latent.dtype)");
        line("    rope_key[:, length:total] = torch.reshape(k_pe, [b, t, %d]).to(rope_key.dtype)", rope);
        line("    ckv = torch.unsqueeze(latent[:, :total], 1)");
        line("    krope = torch.unsqueeze(rope_key[:, :total], 1)");
        line("    q_latent = torch.matmul(q[:, :, :, :%d], wuk)", nope);
        line("    scores = torch.mul(torch.add(torch.matmul(q_latent, torch.transpose(ckv, 2, 3)),"
                + " torch.matmul(q_pe, torch.transpose(krope, 2, 3))), %s)", f32(config.softmaxScale()));
        line("    probs = torch.softmax(torch.add(scores.to(6), mask), -1).to(latent.dtype)");
        line("    out = torch.matmul(torch.matmul(probs, ckv), wuvt)");
        line("    out = torch.reshape(torch.transpose(out, 1, 2), [b, t, %d])", h * v);
        line("    return torch.linear(out, w[kv + 2])");
    }

    private void moe() {
        int hid = config.hiddenSize();
        boolean v3 = config.isV3();
        int s = v3 ? 2 : 1; // first expert stack
        line("  def moe(%s, hidden: Tensor, w: List[Tensor], o: int, chunk: int) -> Tensor:", self());
        line("    flat = torch.reshape(hidden, [-1, %d])", hid);
        line("    idx, weights = self.route(flat, w[o]%s)", v3 ? ", w[o + 1]" : "");
        line("    if chunk > 0:");
        line("      routed = self.gathered(flat, idx, weights, w[o + %d], w[o + %d], w[o + %d], chunk)", s, s + 1, s + 2);
        line("    else:");
        line("      routed = self.sorted(flat, idx, weights, w[o + %d], w[o + %d], w[o + %d], 1)", s, s + 1, s + 2);
        line("    routed = torch.reshape(routed, hidden.size())");
        if (config.nSharedExperts() > 0) {
            line("    routed = torch.add(routed, self.mlp(hidden, w[o + %d], w[o + %d], w[o + %d]))", s + 3, s + 4, s + 5);
        }
        line("    return routed");
        emit.route();
        gathered();
        // the sorted dispatch: one host read of the per-expert counts, each hit expert on its contiguous rows
        emit.sorted("Tensor");
    }

    private void gathered() {
        int hid = config.hiddenSize();
        int k = config.numExpertsPerTok();
        // the gathered dispatch: the chosen experts' rows of each stack, no host read
        line("  def gathered(%s, x: Tensor, idx: Tensor, weights: Tensor, gs: Tensor, us: Tensor, ds: Tensor,"
                + " chunk: int) -> Tensor:", self());
        line("    n = idx.size(0)");
        line("    total = n * %d", k);
        line("    ids = torch.reshape(idx, [total])");
        line("    tokens = torch.reshape(torch.expand(torch.unsqueeze(x, 1), [n, %d, %d]), [total, 1, %d])", k, hid, hid);
        line("    outs: List[Tensor] = []");
        line("    for a in range(0, total, chunk):");
        line("      end = min(total, a + chunk)");
        line("      xc = tokens[a:end]");
        line("      g = self.project(gs, ids[a:end], xc)");
        line("      act = torch.mul(torch.mul(g, torch.sigmoid(g)), self.project(us, ids[a:end], xc))");
        line("      outs.append(self.project(ds, ids[a:end], act))");
        line("    return self.combine(torch.reshape(torch.cat(outs, 0), [total, %d]), weights)", hid);
        line("  def project(%s, stack: Tensor, ids: Tensor, x: Tensor) -> Tensor:", self());
        line("    c = ids.size(0)");
        line("    rows = torch.reshape(torch.index_select(torch.reshape(stack, [stack.size(0), -1]), 0, ids),"
                + " [c, stack.size(1), stack.size(2)])");
        line("    return torch.reshape(torch.matmul(rows, torch.transpose(x, 1, 2)), [c, 1, stack.size(1)])");
    }
}
