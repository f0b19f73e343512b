package ai.djl.memopt.gguf;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Tensor names of llama.cpp's {@code deepseek2} architecture and their Hugging Face counterparts
 * ({@code gguf-py/gguf/constants.py}, {@code convert_hf_to_gguf.py}'s {@code DeepseekV2Model.modify_tensors}).
 *
 * <table>
 *   <caption>Names (i = layer)</caption>
 *   <tr><th>Hugging Face</th><th>GGUF</th><th>layout</th></tr>
 *   <tr><td>model.embed_tokens.weight / model.norm.weight / lm_head.weight</td>
 *       <td>token_embd.weight / output_norm.weight / output.weight (absent when tied)</td><td>as is</td></tr>
 *   <tr><td>input_layernorm, post_attention_layernorm</td><td>blk.i.attn_norm, blk.i.ffn_norm</td><td></td></tr>
 *   <tr><td>self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj</td>
 *       <td>attn_q | attn_q_a, attn_q_a_norm, attn_q_b</td><td></td></tr>
 *   <tr><td>self_attn.kv_a_proj_with_mqa, kv_a_layernorm, o_proj</td>
 *       <td>attn_kv_a_mqa, attn_kv_a_norm, attn_output</td><td></td></tr>
 *   <tr><td>self_attn.kv_b_proj {@code (heads * (nope + v), kv_lora)}</td>
 *       <td>attn_k_b {@code ne [nope, kv_lora, heads]} and attn_v_b {@code ne [kv_lora, v, heads]}</td>
 *       <td>split per head; the key half transposed (MLA weight absorption)</td></tr>
 *   <tr><td>mlp.gate_proj, up_proj, down_proj (dense layers)</td><td>ffn_gate, ffn_up, ffn_down</td><td></td></tr>
 *   <tr><td>mlp.gate.weight, mlp.gate.e_score_correction_bias</td><td>ffn_gate_inp.weight, exp_probs_b.bias</td>
 *       <td>always F32</td></tr>
 *   <tr><td>mlp.experts.e.{gate,up,down}_proj</td><td>ffn_{gate,up,down}_exps {@code ne [in, out, experts]}</td>
 *       <td>stacked, expert e at index e</td></tr>
 *   <tr><td>mlp.shared_experts.{gate,up,down}_proj</td><td>ffn_{gate,up,down}_shexp</td><td></td></tr>
 * </table>
 */
final class DeepSeek2Tensors {

    private static final Pattern LAYER = Pattern.compile("^model\\.layers\\.(\\d+)\\.(.+)$");
    private static final Pattern EXPERT = Pattern.compile("^mlp\\.experts\\.(\\d+)\\.(gate|up|down)_proj\\.weight$");

    private DeepSeek2Tensors() {}

    /** Where a Hugging Face tensor lives in the GGUF file. */
    record Source(String gguf, Kind kind, int expert) {}

    enum Kind {
        /** the same (out, in) matrix or vector */
        DIRECT,
        /** one expert's slice of a stacked {@code (experts, out, in)} tensor */
        EXPERT,
        /** {@code kv_b_proj}, rebuilt from attn_k_b and attn_v_b */
        KV_B
    }

    /**
     * The GGUF source of a Hugging Face parameter name of a {@code DeepSeekForCausalLM}.
     *
     * @throws IllegalArgumentException for a name the mapping does not know
     */
    static Source source(String hf) {
        switch (hf) {
            case "model.embed_tokens.weight":
                return new Source("token_embd.weight", Kind.DIRECT, -1);
            case "model.norm.weight":
                return new Source("output_norm.weight", Kind.DIRECT, -1);
            case "lm_head.weight":
                return new Source("output.weight", Kind.DIRECT, -1);
            default:
                break;
        }
        Matcher m = LAYER.matcher(hf);
        if (!m.matches()) {
            throw new IllegalArgumentException("no GGUF name for tensor '" + hf + "'");
        }
        String blk = "blk." + m.group(1) + ".";
        String rest = m.group(2);
        Matcher e = EXPERT.matcher(rest);
        if (e.matches()) {
            return new Source(blk + "ffn_" + e.group(2) + "_exps.weight", Kind.EXPERT, Integer.parseInt(e.group(1)));
        }
        String name;
        switch (rest) {
            case "input_layernorm.weight": name = "attn_norm.weight"; break;
            case "post_attention_layernorm.weight": name = "ffn_norm.weight"; break;
            case "self_attn.q_proj.weight": name = "attn_q.weight"; break;
            case "self_attn.q_a_proj.weight": name = "attn_q_a.weight"; break;
            case "self_attn.q_a_layernorm.weight": name = "attn_q_a_norm.weight"; break;
            case "self_attn.q_b_proj.weight": name = "attn_q_b.weight"; break;
            case "self_attn.kv_a_proj_with_mqa.weight": name = "attn_kv_a_mqa.weight"; break;
            case "self_attn.kv_a_layernorm.weight": name = "attn_kv_a_norm.weight"; break;
            case "self_attn.kv_b_proj.weight": return new Source(blk + "attn_k_b.weight", Kind.KV_B, -1);
            case "self_attn.o_proj.weight": name = "attn_output.weight"; break;
            case "mlp.gate_proj.weight": name = "ffn_gate.weight"; break;
            case "mlp.up_proj.weight": name = "ffn_up.weight"; break;
            case "mlp.down_proj.weight": name = "ffn_down.weight"; break;
            case "mlp.gate.weight": name = "ffn_gate_inp.weight"; break;
            case "mlp.gate.e_score_correction_bias": name = "exp_probs_b.bias"; break;
            case "mlp.shared_experts.gate_proj.weight": name = "ffn_gate_shexp.weight"; break;
            case "mlp.shared_experts.up_proj.weight": name = "ffn_up_shexp.weight"; break;
            case "mlp.shared_experts.down_proj.weight": name = "ffn_down_shexp.weight"; break;
            default:
                throw new IllegalArgumentException("no GGUF name for tensor '" + hf + "'");
        }
        return new Source(blk + name, Kind.DIRECT, -1);
    }

    /** GGUF dimensions (innermost first) of a PyTorch shape (outermost first), and the other way round. */
    static long[] reverse(long[] dims) {
        long[] out = new long[dims.length];
        for (int i = 0; i < dims.length; i++) {
            out[i] = dims[dims.length - 1 - i];
        }
        return out;
    }

    /**
     * Splits {@code kv_b_proj (heads * (nope + v), kv_lora)} into llama.cpp's {@code attn_k_b}, per head the key rows
     * transposed ({@code ne [nope, kv_lora, heads]}), and {@code attn_v_b}, the value rows as they are
     * ({@code ne [kv_lora, v, heads]}).
     */
    static float[][] splitKvB(float[] kv, DeepSeekConfig c) {
        int heads = c.numAttentionHeads();
        int nope = c.qkNopeHeadDim();
        int v = c.vHeadDim();
        int rank = c.kvLoraRank();
        float[] k = new float[heads * rank * nope];
        float[] vb = new float[heads * v * rank];
        for (int h = 0; h < heads; h++) {
            for (int r = 0; r < rank; r++) {
                for (int j = 0; j < nope; j++) {
                    k[(h * rank + r) * nope + j] = kv[(h * (nope + v) + j) * rank + r];
                }
            }
            System.arraycopy(kv, (h * (nope + v) + nope) * rank, vb, h * v * rank, v * rank);
        }
        return new float[][] {k, vb};
    }

    /** The inverse of {@link #splitKvB}. */
    static float[] joinKvB(float[] k, float[] vb, DeepSeekConfig c) {
        int heads = c.numAttentionHeads();
        int nope = c.qkNopeHeadDim();
        int v = c.vHeadDim();
        int rank = c.kvLoraRank();
        float[] kv = new float[heads * (nope + v) * rank];
        for (int h = 0; h < heads; h++) {
            for (int r = 0; r < rank; r++) {
                for (int j = 0; j < nope; j++) {
                    kv[(h * (nope + v) + j) * rank + r] = k[(h * rank + r) * nope + j];
                }
            }
            System.arraycopy(vb, h * v * rank, kv, (h * (nope + v) + nope) * rank, v * rank);
        }
        return kv;
    }

    /** {@code ne} of attn_k_b and of attn_v_b. */
    static long[][] kvBDims(DeepSeekConfig c) {
        return new long[][] {{c.qkNopeHeadDim(), c.kvLoraRank(), c.numAttentionHeads()},
            {c.kvLoraRank(), c.vHeadDim(), c.numAttentionHeads()}};
    }

    /** The value-half name next to an {@code attn_k_b} name. */
    static String valueHalf(String kb) {
        return kb.replace("attn_k_b", "attn_v_b");
    }

    /** Tensors kept in F32 whatever the file type (llama.cpp's converter: vectors, norms, the router). */
    static boolean alwaysF32(String gguf, long[] ne) {
        return ne.length == 1 || gguf.endsWith("_norm.weight") || gguf.endsWith("ffn_gate_inp.weight")
                || !gguf.endsWith(".weight");
    }

    /**
     * For a V3 model whose rotary embedding rotates halves ({@code rope_interleave: false}), the row permutation of
     * the rotary part that makes it rotate adjacent pairs as llama.cpp does: new row {@code 2i} is old row {@code i},
     * new row {@code 2i+1} old row {@code i + d/2}; null when no permutation is needed.
     */
    static int[] ropePermutation(DeepSeekConfig c) {
        if (!c.isV3() || c.ropeInterleave()) {
            return null;
        }
        int d = c.qkRopeHeadDim();
        int[] perm = new int[d];
        for (int i = 0; i < d / 2; i++) {
            perm[2 * i] = i;
            perm[2 * i + 1] = i + d / 2;
        }
        return perm;
    }
}
