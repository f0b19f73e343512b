package ai.djl.memopt.model.deepseek;

/**
 * The TorchScript source of one {@link DeepSeekDecoderLayer}'s full-sequence forward (training and prefill, see
 * {@link ScriptedLayer}): the operations of the Java path ({@code DeepSeekDecoderLayer}, {@link MultiHeadLatentAttention}
 * non-absorbed with the fused or the eager grouped attention, {@link RmsNorm}, {@link RotaryEmbedding}, {@link MoeGate},
 * the sorted dispatch of {@link DeepSeekMoE}, {@link DeepSeekMlp}) in the same order and types, with the config's sizes
 * and constants written into the code. Norms and the router wrapped in an FP32 island ({@code Fp32Block}) are entered
 * with {@code .to(6)} and left with a cast to the island's outer type, as the island's boundary casts do.
 *
 * <p>Arguments of {@code forward}: {@code x (B, T, hidden)}, {@code cos}, {@code sin}, {@code masks} (empty, or the
 * additive FP32 mask), {@code w} (the layer's own weights, in {@link #weightOrder} order), {@code gs, us, ds} (the
 * routed experts' {@code gate, up, down} weights, one per expert; empty for a dense layer), {@code fused} (causal
 * attention through {@code torch.scaled_dot_product_attention}), {@code group} (heads per eager attention group) and
 * {@code bucket} (expert row padding). Returns {@code (B, T, hidden)}.
 */
final class ScriptedLayerSource {

    static final String CLASS = "DecoderLayer";

    /** No FP32 island: the block runs in the type of its input. */
    static final int PLAIN = -1;
    /** TorchScript's dtype codes, for an island's outer type. */
    static final int FP16 = 5;
    static final int FP32 = 6;

    private final DeepSeekConfig config;
    private final Layout shape;
    private final StringBuilder out = new StringBuilder();
    private final ScriptEmitter emit;

    /**
     * What varies between layers of one config: dense or MoE, and which blocks are FP32 islands (each the TorchScript
     * dtype their output is cast back to, or {@link #PLAIN}).
     */
    record Layout(boolean moe, int inputNorm, int qANorm, int kvANorm, int postNorm, int gate) {}

    private ScriptedLayerSource(DeepSeekConfig config, Layout shape) {
        this.config = config;
        this.shape = shape;
        this.emit = new ScriptEmitter(config, CLASS, out);
    }

    /** The weights of {@code w}, in order (the names of the layer's parameters relative to the layer). */
    static String weightOrder(DeepSeekConfig config, boolean moe) {
        String q = config.qLoraRank().isPresent()
                ? "self_attn.q_a_proj, self_attn.q_a_layernorm, self_attn.q_b_proj" : "self_attn.q_proj";
        String mlp = !moe ? "mlp.gate_proj, mlp.up_proj, mlp.down_proj"
                : "mlp.gate" + (config.isV3() ? ", mlp.gate.e_score_correction_bias" : "")
                        + (config.nSharedExperts() > 0
                                ? ", mlp.shared_experts.gate_proj, mlp.shared_experts.up_proj,"
                                        + " mlp.shared_experts.down_proj" : "");
        return "input_layernorm, " + q + ", self_attn.kv_a_proj_with_mqa, self_attn.kv_a_layernorm,"
                + " self_attn.kv_b_proj, self_attn.o_proj, post_attention_layernorm, " + mlp;
    }

    /** The class body for a layer of this shape. */
    static String classBody(DeepSeekConfig config, Layout shape) {
        ScriptedLayerSource s = new ScriptedLayerSource(config, shape);
        s.forward();
        s.attention();
        s.emit.rms();
        s.emit.rope();
        s.emit.mlp();
        if (shape.moe()) {
            s.moe();
            s.emit.route();
            s.emit.sorted("List[Tensor]");
        }
        return s.out.toString();
    }

    private void line(String format, Object... args) {
        emit.line(format, args);
    }

    /** A norm call, through its FP32 island's boundary casts when it has one. */
    private static String norm(String x, String w, int island) {
        return island == PLAIN ? "self.rms(" + x + ", " + w + ")" : "self.rms(" + x + ".to(6), " + w + ").to(" + island + ")";
    }

    private int attentionEnd() {
        return config.qLoraRank().isPresent() ? 8 : 6; // index of post_attention_layernorm in w
    }

    private void forward() {
        line("  def forward(%s, x: Tensor, cos: Tensor, sin: Tensor, masks: List[Tensor], w: List[Tensor],"
                + " gs: List[Tensor], us: List[Tensor], ds: List[Tensor], fused: bool, group: int, bucket: int)"
                + " -> Tensor:", emit.self());
        line("    h = torch.add(x, self.attn(%s, cos, sin, masks, w, fused, group))", norm("x", "w[0]", shape.inputNorm()));
        int p = attentionEnd();
        String normed = norm("h", "w[" + p + "]", shape.postNorm());
        if (shape.moe()) {
            line("    return torch.add(h, self.moe(%s, w, gs, us, ds, bucket))", normed);
        } else {
            line("    return torch.add(h, self.mlp(%s, w[%d], w[%d], w[%d]))", normed, p + 1, p + 2, p + 3);
        }
    }

    private void attention() {
        int h = config.numAttentionHeads();
        int nope = config.qkNopeHeadDim();
        int rope = config.qkRopeHeadDim();
        int r = config.kvLoraRank();
        String scale = ScriptEmitter.f32(config.softmaxScale());
        line("  def attn(%s, x: Tensor, cos: Tensor, sin: Tensor, masks: List[Tensor], w: List[Tensor], fused: bool,"
                + " group: int) -> Tensor:", emit.self());
        line("    b = x.size(0)");
        line("    t = x.size(1)");
        int kv;
        if (config.qLoraRank().isPresent()) {
            line("    q = torch.linear(%s, w[3])", norm("torch.linear(x, w[1])", "w[2]", shape.qANorm()));
            kv = 4;
        } else {
            line("    q = torch.linear(x, w[1])");
            kv = 2;
        }
        line("    q = torch.transpose(torch.reshape(q, [b, t, %d, %d]), 1, 2)", h, nope + rope); // (B, H, T, qk)
        // split_with_sizes as the Java path's split: one backward per split, not a full-size zero-fill per part
        line("    q_split = torch.split_with_sizes(q, [%d, %d], 3)", nope, rope);
        line("    compressed = torch.split_with_sizes(torch.linear(x, w[%d]), [%d, %d], 2)", kv, r, rope);
        line("    latent = %s", norm("compressed[0]", "w[" + (kv + 1) + "]", shape.kvANorm()));
        line("    kv = torch.transpose(torch.reshape(torch.linear(latent, w[%d]), [b, t, %d, %d]), 1, 2)", kv + 2, h,
                nope + config.vHeadDim()); // (B, H, T, nope + v)
        line("    kv_split = torch.split_with_sizes(kv, [%d, %d], 3)", nope, config.vHeadDim());
        line("    k_rot = torch.reshape(compressed[1], [b, 1, t, %d])", rope);
        line("    q_rot = self.rope(q_split[1], cos, sin)");
        line("    k_rot = torch.expand(self.rope(k_rot, cos, sin), [b, %d, t, %d])", h, rope);
        line("    query = torch.cat([q_split[0], q_rot], -1)");
        line("    key = torch.cat([kv_split[0], k_rot], -1)");
        line("    value = kv_split[1]");
        line("    if fused:");
        line("      out = torch.scaled_dot_product_attention(query, key, value, None, 0., True, scale=%s)", scale);
        line("    else:");
        line("      out = self.attend(query, key, value, masks, group)");
        line("    out = torch.reshape(torch.transpose(out, 1, 2), [b, t, %d])", h * config.vHeadDim());
        line("    return torch.linear(out, w[%d])", kv + 3);
        // the eager path: heads in groups (MultiHeadLatentAttention.attend), FP32 softmax (attendHeads)
        line("  def attend(%s, q: Tensor, k: Tensor, v: Tensor, masks: List[Tensor], group: int) -> Tensor:",
                emit.self());
        line("    heads = q.size(1)");
        line("    if group >= heads:");
        line("      return self.attend_heads(q, k, v, masks)");
        line("    outs: List[Tensor] = []");
        line("    for h0 in range(0, heads, group):");
        line("      h1 = min(heads, h0 + group)");
        line("      outs.append(self.attend_heads(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], masks))");
        line("    return torch.cat(outs, 1)");
        line("  def attend_heads(%s, q: Tensor, k: Tensor, v: Tensor, masks: List[Tensor]) -> Tensor:", emit.self());
        line("    raw = torch.matmul(q, torch.permute(k, [0, 1, 3, 2]))");
        // the scale as a 0-dim array of the scores' type, as Scalars.mul does (in FP16 it is rounded to FP16 first)
        line("    s32 = torch.mul(raw, torch.full([], %s, dtype=raw.dtype, device=raw.device)).to(6)", scale);
        line("    if len(masks) > 0:");
        line("      additive = masks[0].to(s32.device)");
        line("    else:");
        line("      additive = self.causal(q.size(2), k.size(2), s32.device)");
        line("    probs = torch.softmax(torch.add(s32, additive), -1).to(q.dtype)");
        line("    return torch.matmul(probs, v)");
        line("  def causal(%s, t: int, s: int, device: Device) -> Tensor:", emit.self());
        line("    q_pos = torch.reshape(torch.arange(s - t, s, dtype=4, device=device), [t, 1])");
        line("    k_pos = torch.reshape(torch.arange(0, s, dtype=4, device=device), [1, s])");
        line("    zeros = torch.zeros([t, s], dtype=6, device=device)");
        line("    neg = torch.full([t, s], %s, dtype=6, device=device)", Double.toString(-Float.MAX_VALUE));
        line("    return torch.reshape(torch.where(torch.ge(q_pos, k_pos), zeros, neg), [1, 1, t, s])");
    }

    private void moe() {
        int p = attentionEnd();
        boolean v3 = config.isV3();
        int shared = p + 2 + (v3 ? 1 : 0);
        line("  def moe(%s, hidden: Tensor, w: List[Tensor], gs: List[Tensor], us: List[Tensor], ds: List[Tensor],"
                + " bucket: int) -> Tensor:", emit.self());
        line("    flat = torch.reshape(hidden, [-1, %d])", config.hiddenSize());
        String gateIn = shape.gate() == PLAIN ? "flat" : "flat.to(6)";
        line("    idx, weights = self.route(%s, w[%d]%s)", gateIn, p + 1, v3 ? ", w[" + (p + 2) + "]" : "");
        if (shape.gate() != PLAIN) {
            line("    weights = weights.to(%d)", shape.gate());
        }
        line("    routed = torch.reshape(self.sorted(flat, idx, weights, gs, us, ds, bucket), hidden.size())");
        if (config.nSharedExperts() > 0) {
            line("    routed = torch.add(routed, self.mlp(hidden, w[%d], w[%d], w[%d]))", shared, shared + 1, shared + 2);
        }
        line("    return routed");
    }
}
