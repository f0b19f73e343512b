package ai.djl.memopt.model.deepseek;

import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;

/**
 * Rotary position embedding of the {@code qk_rope_head_dim} part of queries and keys, with optional YaRN scaling,
 * matching Hugging Face transformers for both layouts:
 *
 * <ul>
 *   <li>DeepSeek-V3 ({@code rope_interleave} true): the interleaved pairs {@code (x0,x1),(x2,x3)...} are first
 *       de-interleaved to {@code [x0,x2,...,x1,x3,...]}, then rotated with {@code rotate_half} against
 *       {@code cos/sin = cat(freqs, freqs)}; the output stays in the de-interleaved layout. With {@code rope_interleave}
 *       false the de-interleave step is skipped.
 *   <li>DeepSeek-V2: adjacent pairs are complex numbers multiplied by {@code e^{i*freq}}; the output stays interleaved.
 * </ul>
 *
 * <p>Positions come from {@code position_ids}, so decoding at an offset uses the right angles. YaRN blends the
 * interpolated and extrapolated inverse frequencies with a linear ramp between the {@code beta_fast}/{@code beta_slow}
 * correction dims and multiplies cos/sin by the attention factor (transformers' {@code _compute_yarn_parameters}).
 *
 * <p>Shapes: {@link #cosSin} takes {@code position_ids (B, T)} INT64 and returns FP32 {@code cos, sin} of shape
 * {@code (B, T, d)} (V3) or {@code (B, T, d/2)} (V2); {@link #apply} rotates {@code x (B, heads, T, d)} in place of
 * layout and returns the same shape and type. As a block: {@code (x, position_ids) -> (rotated x)}.
 *
 * <pre>{@code
 * NDList cs = rotary.cosSin(positionIds);      // positions 0..T-1, or past..past+T-1 when decoding
 * NDArray qRot = rotary.apply(qPe, cs);         // (B, H, T, qk_rope_head_dim)
 * }</pre>
 */
public final class RotaryEmbedding extends AbstractBlock {

    private static final byte VERSION = 1;

    private final int dim;
    private final boolean complexPairs;
    private final boolean deinterleave;
    private final float[] invFreq;
    private final float attentionScaling;

    /** Builds the rotary embedding for a config's {@code qk_rope_head_dim} and rope parameters. */
    public RotaryEmbedding(DeepSeekConfig config) {
        super(VERSION);
        this.dim = config.qkRopeHeadDim();
        this.complexPairs = !config.isV3();
        this.deinterleave = config.isV3() && config.ropeInterleave();
        this.invFreq = inverseFrequencies(config);
        this.attentionScaling = (float) config.ropeAttentionScaling();
    }

    /** The inverse frequencies ({@code dim/2} of them) as transformers computes them in FP32. */
    static float[] inverseFrequencies(DeepSeekConfig config) {
        int dim = config.qkRopeHeadDim();
        double base = config.ropeTheta();
        int half = dim / 2;
        float[] posFreqs = new float[half];
        for (int i = 0; i < half; i++) {
            float exponent = (float) (2 * i) / dim;
            posFreqs[i] = (float) Math.pow(base, exponent);
        }
        float[] inv = new float[half];
        if (!config.isYarn()) {
            for (int i = 0; i < half; i++) {
                inv[i] = 1.0f / posFreqs[i];
            }
            return inv;
        }
        double factor = config.yarnFactor();
        int original = config.yarnOriginalContext();
        double low = correctionDim(config.betaFast(), dim, base, original);
        double high = correctionDim(config.betaSlow(), dim, base, original);
        if (config.ropeTruncate()) {
            low = Math.floor(low);
            high = Math.ceil(high);
        }
        low = Math.max(low, 0);
        high = Math.min(high, dim - 1);
        if (low == high) {
            high += 0.001; // transformers' guard against a zero-width ramp
        }
        for (int i = 0; i < half; i++) {
            float extrapolation = 1.0f / posFreqs[i];
            float interpolation = 1.0f / ((float) factor * posFreqs[i]);
            float ramp = (float) Math.min(1.0, Math.max(0.0, (i - low) / (high - low)));
            float extrapolationFactor = 1.0f - ramp;
            inv[i] = interpolation * (1 - extrapolationFactor) + extrapolation * extrapolationFactor;
        }
        return inv;
    }

    private static double correctionDim(double rotations, int dim, double base, int maxPositions) {
        return (dim * Math.log(maxPositions / (rotations * 2 * Math.PI))) / (2 * Math.log(base));
    }

    /** Rotary dimension ({@code qk_rope_head_dim}). */
    public int dim() {
        return dim;
    }

    /** True for the V2 layout (complex multiplication of adjacent pairs). */
    public boolean isComplexPairs() {
        return complexPairs;
    }

    /** The factor cos/sin are multiplied by (YaRN attention factor, 1 otherwise). */
    public float attentionScaling() {
        return attentionScaling;
    }

    /** A copy of the inverse frequencies. */
    public float[] inverseFrequencies() {
        return invFreq.clone();
    }

    /**
     * Cos and sin (already multiplied by the attention scaling) for the given positions, in FP32.
     *
     * @param positionIds {@code (B, T)} or {@code (T)} integer positions
     * @return {@code cos, sin} of shape {@code (B, T, d)} for V3, {@code (B, T, d/2)} for V2
     */
    public NDList cosSin(NDArray positionIds) {
        return Scoped.run(() -> {
            NDManager m = positionIds.getManager();
            NDArray pos = positionIds.getShape().dimension() == 1 ? positionIds.expandDims(0) : positionIds;
            NDArray inv = m.create(invFreq).toDevice(positionIds.getDevice(), false); // (d/2)
            NDArray freqs = pos.toType(DataType.FLOAT32, false).expandDims(-1).mul(inv); // (B, T, d/2)
            NDArray emb = complexPairs ? freqs : freqs.concat(freqs, -1); // (B, T, d) or (B, T, d/2)
            NDArray cos = emb.cos();
            NDArray sin = emb.sin();
            if (attentionScaling != 1.0f) {
                cos = cos.mul(attentionScaling);
                sin = sin.mul(attentionScaling);
            }
            return new NDList(cos, sin);
        });
    }

    /**
     * Rotates {@code x (B, heads, T, d)} by the angles of {@code cosSin} ({@code (B, T, ...)} from {@link #cosSin}).
     *
     * @return the rotated array, same shape and type as {@code x}
     */
    public NDArray apply(NDArray x, NDList cosSin) {
        return Scoped.run(() -> {
            NDArray cos = cosSin.get(0).expandDims(1); // (B, 1, T, .)
            NDArray sin = cosSin.get(1).expandDims(1);
            Shape s = x.getShape();
            int nd = s.dimension();
            long d = s.get(nd - 1);
            DataType type = x.getDataType();
            if (complexPairs) {
                // (a + ib) * (c + is) over adjacent pairs, computed in FP32 as transformers' view_as_complex
                NDArray pairs = TypeCasts.cast(x, DataType.FLOAT32).reshape(pairShape(s)); // (..., d/2, 2)
                NDList ab = pairs.split(2, nd);
                NDArray a = ab.get(0).squeeze(nd); // (..., d/2)
                NDArray b = ab.get(1).squeeze(nd);
                NDArray re = a.mul(cos).sub(b.mul(sin));
                NDArray im = a.mul(sin).add(b.mul(cos));
                return new NDList(TypeCasts.cast(re.stack(im, nd).reshape(s), type));
            }
            NDArray xr = x;
            if (deinterleave) {
                // (.., d/2, 2) -> (.., 2, d/2): [x0, x2, ..., x1, x3, ...]
                int[] axes = new int[nd + 1];
                for (int i = 0; i < nd + 1; i++) {
                    axes[i] = i;
                }
                axes[nd - 1] = nd;
                axes[nd] = nd - 1;
                xr = x.reshape(pairShape(s)).transpose(axes).reshape(s);
            }
            NDList halves = xr.split(2, nd - 1);
            NDArray rotated = halves.get(1).neg().concat(halves.get(0), nd - 1); // rotate_half
            NDArray c = cos.toType(type, false);
            NDArray sn = sin.toType(type, false);
            return new NDList(xr.mul(c).add(rotated.mul(sn)));
        }).head();
    }

    private static Shape pairShape(Shape s) {
        int nd = s.dimension();
        long[] dims = new long[nd + 1];
        for (int i = 0; i < nd - 1; i++) {
            dims[i] = s.get(i);
        }
        dims[nd - 1] = s.get(nd - 1) / 2;
        dims[nd] = 2;
        return new Shape(dims);
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        NDList cs = cosSin(inputs.get(1));
        try {
            return new NDList(apply(inputs.get(0), cs));
        } finally {
            cs.close();
        }
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0]};
    }
}
