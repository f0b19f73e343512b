package ai.djl.memopt.model.deepseek;

import java.util.Locale;

/**
 * TorchScript source of the pieces a DeepSeek decoder layer is made of, shared by the generated modules that run
 * layers in one call: the training/prefill layer ({@link ScriptedLayer}) and the inference decode step. Each method
 * writes one TorchScript method of the class being generated, with the same operations, in the same order and types,
 * as the Java blocks ({@link RmsNorm}, {@link RotaryEmbedding}, {@link DeepSeekMlp}, {@link MoeGate}, the sorted
 * dispatch and {@code combine} of {@link DeepSeekMoE}); the config's sizes and constants are written into the code.
 * Dtypes are TorchScript's integers: 4 is INT64, 5 FP16, 6 FP32.
 *
 * <pre>{@code
 * StringBuilder body = new StringBuilder();
 * ScriptEmitter e = new ScriptEmitter(config, "DecoderLayer", body);
 * e.line("  def forward(%s, x: Tensor, w: Tensor) -> Tensor:", e.self());
 * e.line("    return self.rms(x, w)");
 * e.rms();
 * byte[] zip = TorchScriptArchive.write("DecoderLayer", body.toString());
 * }</pre>
 */
public final class ScriptEmitter {

    private final DeepSeekConfig config;
    private final String className;
    private final StringBuilder out;

    /**
     * @param config the model config whose sizes and constants the code holds
     * @param className the generated class (its methods type {@code self} as {@code __torch__.<className>})
     * @param out where the source goes
     */
    public ScriptEmitter(DeepSeekConfig config, String className, StringBuilder out) {
        this.config = config;
        this.className = className;
        this.out = out;
    }

    /** A float constant as the exact double of its FP32 value, so that FP32 kernels see the same float. */
    public static String f32(double value) {
        return Double.toString((double) (float) value);
    }

    /** Appends one formatted line (and a newline). */
    public void line(String format, Object... args) {
        out.append(String.format(Locale.ROOT, format, args)).append('\n');
    }

    /** The typed {@code self} parameter of a method of the generated class. */
    public String self() {
        return "self: __torch__." + className;
    }

    /** {@code rms(x, w)}: {@link RmsNorm#apply}. */
    public void rms() {
        line("  def rms(%s, x: Tensor, w: Tensor) -> Tensor:", self());
        line("    x32 = x.to(6)");
        line("    variance = torch.mean(torch.square(x32), [-1], True)");
        line("    normed = torch.div(x32, torch.sqrt(torch.add(variance, %s)))", f32(config.rmsNormEps()));
        line("    return torch.mul(w, normed.to(x.dtype))");
    }

    /** {@code rope(x (B, heads, T, d), cos, sin)}: {@link RotaryEmbedding#apply}. */
    public void rope() {
        int d = config.qkRopeHeadDim();
        int half = d / 2;
        line("  def rope(%s, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:", self());
        line("    c = torch.unsqueeze(cos, 1)");
        line("    s = torch.unsqueeze(sin, 1)");
        line("    b = x.size(0)");
        line("    h = x.size(1)");
        line("    t = x.size(2)");
        if (!config.isV3()) {
            // V2: adjacent pairs as complex numbers, in FP32
            // split, as the Java path: one backward for both halves instead of one full-size zero-fill per part
            line("    ab = torch.split(torch.reshape(x.to(6), [b, h, t, %d, 2]), 1, 4)", half);
            line("    a = torch.squeeze(ab[0], 4)");
            line("    bb = torch.squeeze(ab[1], 4)");
            line("    re = torch.sub(torch.mul(a, c), torch.mul(bb, s))");
            line("    im = torch.add(torch.mul(a, s), torch.mul(bb, c))");
            line("    return torch.reshape(torch.stack([re, im], 4), [b, h, t, %d]).to(x.dtype)", d);
            return;
        }
        if (config.ropeInterleave()) {
            line("    xr = torch.reshape(torch.transpose(torch.reshape(x, [b, h, t, %d, 2]), 3, 4), [b, h, t, %d])",
                    half, d);
        } else {
            line("    xr = x");
        }
        line("    halves = torch.split(xr, %d, 3)", half);
        line("    rotated = torch.cat([torch.neg(halves[1]), halves[0]], 3)");
        line("    return torch.add(torch.mul(xr, c.to(x.dtype)), torch.mul(rotated, s.to(x.dtype)))");
    }

    /**
     * {@code cos_sin(positions (B, T) integer, inv_freq (d/2) FP32) -> (cos, sin)}: {@link RotaryEmbedding#cosSin},
     * whose {@link RotaryEmbedding#inverseFrequencies()} the caller passes.
     */
    public void cosSin() {
        line("  def cos_sin(%s, positions: Tensor, inv_freq: Tensor) -> Tuple[Tensor, Tensor]:", self());
        line("    freqs = torch.mul(torch.unsqueeze(positions.to(6), -1), inv_freq)");
        line(config.isV3() ? "    emb = torch.cat([freqs, freqs], -1)" : "    emb = freqs");
        line("    cos = torch.cos(emb)");
        line("    sin = torch.sin(emb)");
        float scaling = (float) config.ropeAttentionScaling();
        if (scaling != 1.0f) {
            line("    cos = torch.mul(cos, %s)", f32(scaling));
            line("    sin = torch.mul(sin, %s)", f32(scaling));
        }
        line("    return cos, sin");
    }

    /** {@code mlp(x, gate, up, down)}: {@link DeepSeekMlp}'s SwiGLU. */
    public void mlp() {
        line("  def mlp(%s, x: Tensor, g: Tensor, u: Tensor, d: Tensor) -> Tensor:", self());
        line("    gg = torch.linear(x, g)");
        line("    return torch.linear(torch.mul(torch.mul(gg, torch.sigmoid(gg)), torch.linear(x, u)), d)");
    }

    /**
     * {@code route(flat (N, hidden), weight[, e_score_correction_bias]) -> (idx (N, k), weights (N, k) FP32)}:
     * {@link MoeGate}. The expert choice is made on detached scores, as the Java router's {@code stopGradient}.
     */
    public void route() {
        int e = config.nRoutedExperts();
        int k = config.numExpertsPerTok();
        boolean v3 = config.isV3();
        line("  def route(%s, flat: Tensor, gate: Tensor%s) -> Tuple[Tensor, Tensor]:", self(),
                v3 ? ", bias: Tensor" : "");
        line("    n = flat.size(0)");
        line("    logits = torch.matmul(flat.to(6), torch.t(gate.to(6)))");
        if (v3) {
            int groups = config.nGroup();
            line("    scores = torch.sigmoid(logits)");
            line("    choice = torch.add(torch.detach(scores), torch.unsqueeze(bias.to(6), 0))");
            line("    group_scores = torch.sum(torch.topk(torch.reshape(choice, [n, %d, %d]), 2, -1, True, True)[0], [-1])",
                    groups, e / groups);
            line("    idx = torch.topk(self.mask_groups(choice, group_scores), %d, -1, True, True)[1]", k);
        } else {
            line("    scores = torch.softmax(logits, -1)");
            line("    plain = torch.detach(scores)");
            if ("group_limited_greedy".equals(config.topkMethod())) {
                int groups = config.nGroup();
                line("    group_scores = torch.amax(torch.reshape(plain, [n, %d, %d]), [-1])", groups, e / groups);
                line("    idx = torch.topk(self.mask_groups(plain, group_scores), %d, -1, True, True)[1]", k);
            } else {
                line("    idx = torch.topk(plain, %d, -1, True, True)[1]", k);
            }
        }
        line("    weights = torch.gather(scores, 1, idx)");
        if (config.normTopkProb() && (v3 || k > 1)) {
            line("    weights = torch.div(weights, torch.add(torch.sum(weights, [-1], True), 1e-20))");
        }
        line("    weights = torch.mul(weights, %s)", f32(config.routedScalingFactor()));
        line("    return idx, weights");
        maskGroups();
    }

    /** {@code mask_groups(scores, group_scores)}: the router's group limit (transformers' masked_fill 0.0). */
    private void maskGroups() {
        int e = config.nRoutedExperts();
        int groups = Math.max(1, config.nGroup());
        line("  def mask_groups(%s, scores: Tensor, group_scores: Tensor) -> Tensor:", self());
        line("    n = scores.size(0)");
        line("    group_idx = torch.topk(group_scores, %d, -1, True, True)[1]", config.topkGroup());
        line("    group_mask = torch.scatter(torch.zeros([n, %d], dtype=6, device=scores.device), 1, group_idx,"
                + " torch.ones([n, %d], dtype=6, device=scores.device))", groups, config.topkGroup());
        line("    score_mask = torch.reshape(torch.expand(torch.unsqueeze(group_mask, -1), [n, %d, %d]), [n, %d])",
                groups, e / groups, e);
        line("    return torch.mul(scores, score_mask)");
    }

    /**
     * {@code sorted(x (N, hidden), idx, weights, gate, up, down, bucket) -> (N, hidden)}: {@link DeepSeekMoE}'s sorted
     * dispatch, with one host read of the per-expert counts ({@code tolist}). Each expert's rows are padded to a
     * multiple of {@code bucket} (repeating its last row, whose extra outputs are dropped) as the Java dispatch does for
     * FP16 on the CPU. Also writes {@link #combine()}.
     *
     * @param expertWeights the TorchScript type of the expert weights: {@code Tensor} for stacks {@code (E, out, in)},
     *     {@code List[Tensor]} for one array per expert
     */
    public void sorted(String expertWeights) {
        int e = config.nRoutedExperts();
        int k = config.numExpertsPerTok();
        String w = expertWeights;
        line("  def sorted(%s, x: Tensor, idx: Tensor, weights: Tensor, gs: %s, us: %s, ds: %s, bucket: int)"
                + " -> Tensor:", self(), w, w, w);
        line("    ids = torch.reshape(idx, [-1])");
        line("    order = torch.argsort(ids, stable=True)");
        line("    counts: List[int] = torch.bincount(ids, None, %d).tolist()", e);
        line("    tokens = torch.div(order, %d, rounding_mode='floor')", k);
        line("    if bucket > 1:");
        line("      pieces: List[Tensor] = []");
        line("      start = 0");
        line("      for i in range(%d):", e);
        line("        c = counts[i]");
        line("        if c > 0:");
        line("          piece = tokens[start:start + c]");
        line("          p = (c + bucket - 1) // bucket * bucket");
        line("          if p > c:");
        line("            piece = torch.cat([piece, torch.expand(piece[c - 1:c], [p - c])], 0)");
        line("          pieces.append(piece)");
        line("          start = start + c");
        line("      tokens = torch.cat(pieces, 0)");
        line("    rows = x[tokens]");
        line("    outs: List[Tensor] = []");
        line("    start = 0");
        line("    for i in range(%d):", e);
        line("      c = counts[i]");
        line("      if c > 0:");
        line("        p = (c + bucket - 1) // bucket * bucket");
        line("        out = self.mlp(rows[start:start + p], gs[i], us[i], ds[i])");
        line("        if p > c:");
        line("          out = out[0:c]");
        line("        outs.append(out)");
        line("        start = start + p");
        line("    if len(outs) == 1:");
        line("      grouped = outs[0]");
        line("    else:");
        line("      grouped = torch.cat(outs, 0)");
        line("    return self.combine(grouped[torch.argsort(order)], weights)");
        combine();
    }

    /** {@code combine(out (N*k, hidden), weights (N, k))}: {@code DeepSeekMoE.combine}. */
    private void combine() {
        line("  def combine(%s, out: Tensor, weights: Tensor) -> Tensor:", self());
        line("    n = weights.size(0)");
        line("    k = weights.size(1)");
        line("    weighted = torch.mul(out, torch.reshape(weights, [n * k, 1]).to(out.dtype)).to(6)");
        line("    return torch.sum(torch.reshape(weighted, [n, k, out.size(1)]), [1]).to(out.dtype)");
    }
}
