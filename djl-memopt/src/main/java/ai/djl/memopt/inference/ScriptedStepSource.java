package ai.djl.memopt.inference;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.ScriptEmitter;
import java.util.List;

/**
 * The TorchScript source of one stage's decode step (see {@link ScriptedStage}): the same operations, in the same
 * order and types, as the Java path ({@code DecoderStage.Cache.forward/attend}, {@code GatheredExperts}, and through
 * {@link ScriptEmitter}, shared with the training layer script, {@code RmsNorm}, {@code RotaryEmbedding},
 * {@code MoeGate}, the sorted dispatch, {@code DeepSeekMoE.combine}), with the config's sizes and constants written into
 * the code. Dtypes are TorchScript's integers: 6 is FP32.
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
     */
    static String classBody(DeepSeekConfig config, List<Boolean> moe) {
        ScriptedStepSource s = new ScriptedStepSource(config);
        s.forward(moe);
        s.emit.rms();
        s.emit.rope();
        s.attention();
        s.emit.mlp();
        if (moe.contains(true)) {
            s.moe();
        }
        return s.out.toString();
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

    private void forward(List<Boolean> moe) {
        line("  def forward(%s, hidden: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, w: List[Tensor],"
                + " latent: List[Tensor], rope_key: List[Tensor], wuk: List[Tensor], wuvt: List[Tensor],"
                + " chunks: List[int], length: int, total: int) -> Tensor:", self());
        line("    h = hidden");
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
        line("    return h");
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
