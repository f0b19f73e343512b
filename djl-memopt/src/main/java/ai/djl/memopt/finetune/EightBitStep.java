package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;

/**
 * One AdamW step of {@link EightBitAdamW} over flat arrays (one parameter, or a bucket of parameters laid end to end):
 * the arithmetic, chunk by chunk. A chunk is {@code rows} whole blocks of the flat arrays viewed as (rows, block);
 * for each, the stored moments are dequantized (8-bit) or viewed (FP32), the rule is applied in place on views of the
 * weight, the moments are requantized and the weight is copied into the working copy. The rule's scalars are made on
 * the weight's device once per step, not per chunk (those that never change once per device).
 *
 * <p>Temporaries of a quantized chunk of {@code c} elements, at most at once: the FP32 gradient (4 c, when it is not
 * FP32 already or is divided), the two dequantized moments (8 c) and, while one moment is decoded or encoded, at most
 * about 21 c more ({@link BlockwiseCode.OnDevice#encode}; decoding's INT64 index and gathered entries, 12 c), so about
 * 33 bytes per element of the chunk; an FP32-moment chunk needs the gradient and the rule's two temporaries (12 c).
 */
final class EightBitStep {

    private final EightBitAdamW o;
    private final MomentState s;
    private final NDArray weight;
    private final NDArray grad;
    private final NDArray working;
    private final NDArray first;
    private final NDArray second;
    private final NDManager scope;
    // the rule's scalars, FP32 on the weight's device, computed exactly as StatefulOptimizer's UpdateRules.adam does
    private final NDArray divisor;
    private final NDArray oneMinusBeta1;
    private final NDArray beta1;
    private final NDArray beta2;
    private final NDArray oneMinusBeta2;
    private final NDArray decay;
    private final NDArray sqrtCorrection2;
    private final NDArray epsilon;
    private final NDArray stepSize;

    /**
     * @param s the moments (their step count already advanced)
     * @param weight the flat FP32 weight, updated in place
     * @param grad the flat gradient, of any floating type, divided by {@code gradDivisor}
     * @param working null, or the flat working copy receiving the updated weight in its own type
     * @param scope where the temporaries of the whole step live (closed by the caller)
     */
    private EightBitStep(EightBitAdamW o, MomentState s, NDArray weight, NDArray grad, NDArray working,
            float gradDivisor, NDManager scope) {
        this.o = o;
        this.s = s;
        this.weight = weight;
        this.grad = grad;
        this.working = working;
        this.scope = scope;
        this.first = s.quantized ? null : flat(s.firstFp32);
        this.second = s.quantized ? null : flat(s.secondFp32);
        double correction1 = 1 - Math.pow(o.beta1(), s.step);
        double correction2 = 1 - Math.pow(o.beta2(), s.step);
        this.divisor = gradDivisor == 1f ? null : scalar(gradDivisor);
        NDArray[] constants = o.constants(weight.getDevice());
        this.oneMinusBeta1 = constants[0];
        this.beta1 = constants[1];
        this.beta2 = constants[2];
        this.oneMinusBeta2 = constants[3];
        this.epsilon = constants[4];
        this.decay = o.weightDecay() == 0 ? null : scalar(1 - o.learningRate() * o.weightDecay());
        this.sqrtCorrection2 = scalar((float) Math.sqrt(correction2));
        this.stepSize = scalar((float) (o.learningRate() / correction1));
    }

    /** The step of {@code s} (its count already advanced) over the flat arrays, in chunks of {@code chunkBlocks}. */
    static void run(EightBitAdamW o, MomentState s, NDArray weight, NDArray grad, NDArray working, float gradDivisor,
            long chunkBlocks, NDManager scope) {
        EightBitStep step = new EightBitStep(o, s, weight, grad, working, gradDivisor, scope);
        int blockSize = o.blockSize();
        long n = weight.size();
        if (!s.quantized) { // no blocks to keep whole: flat chunks of the same size
            long most = chunkBlocks * blockSize;
            for (long start = 0; start < n; start += most) {
                step.chunk(start, 1, Math.min(most, n - start));
            }
            return;
        }
        long fullBlocks = n / blockSize;
        for (long b0 = 0; b0 < fullBlocks; b0 += chunkBlocks) {
            step.chunk(b0 * blockSize, Math.min(chunkBlocks, fullBlocks - b0), blockSize);
        }
        long tail = n - fullBlocks * blockSize;
        if (tail > 0) {
            step.chunk(fullBlocks * blockSize, 1, tail);
        }
    }

    private NDArray scalar(double value) {
        return UpdateRules.scalar(weight, value, scope);
    }

    private NDArray flat(NDArray a) {
        NDArray view = a.reshape(-1);
        view.attach(scope);
        return view;
    }

    /**
     * Elements {@code [start, start + rows cols)} as (rows, cols): for 8-bit moments blocks {@code start / B} on, each
     * {@code cols} long (the last may be partial: then rows is 1).
     */
    private void chunk(long start, long rows, long cols) {
        long b0 = start / o.blockSize();
        try (NDManager tmp = scope.newSubManager()) {
            NDArray w = MomentState.piece(weight, start, rows, cols, tmp);
            NDArray g = unscaled(MomentState.piece(grad, start, rows, cols, tmp), tmp);
            MomentState.Quantized.Piece q1 = null;
            MomentState.Quantized.Piece q2 = null;
            NDArray m;
            NDArray v;
            if (s.quantized) {
                q1 = s.first.piece(b0, rows, cols, tmp);
                q2 = s.second.piece(b0, rows, cols, tmp);
                m = q1.decode(tmp);
                v = q2.decode(tmp);
            } else {
                m = MomentState.piece(first, start, rows, cols, tmp);
                v = MomentState.piece(second, start, rows, cols, tmp);
            }
            adamw(w, g, m, v, tmp);
            if (s.quantized) {
                q1.encode(m, tmp);
                m.close();
                q2.encode(v, tmp);
            }
            if (working != null) {
                UpdateRules.copyInto(MomentState.piece(working, start, rows, cols, tmp), w, tmp);
            }
        }
    }

    /** The gradient chunk in FP32 divided by the divisor, never in place on the gradient itself. */
    private NDArray unscaled(NDArray g, NDManager tmp) {
        if (g.getDataType() != DataType.FLOAT32) {
            NDArray wide = g.toType(DataType.FLOAT32, false); // a new array
            wide.attach(tmp);
            return divisor == null ? wide : wide.divi(divisor);
        }
        if (divisor == null) {
            return g;
        }
        NDArray scaled = g.div(divisor);
        scaled.attach(tmp);
        return scaled;
    }

    /**
     * The rule on one chunk, in place on {@code w}, {@code m} and {@code v}: {@link UpdateRules#adam}'s operations in
     * its order (so the FP32 path gives StatefulOptimizer's bits), each temporary closed once used.
     */
    private void adamw(NDArray w, NDArray g, NDArray m, NDArray v, NDManager tmp) {
        try (NDArray scaledGrad = g.mul(oneMinusBeta1)) {
            m.muli(beta1).addi(scaledGrad);
        }
        try (NDArray square = g.square()) {
            v.muli(beta2).addi(square.muli(oneMinusBeta2));
        }
        g.close(); // a widened or divided copy, or a view's own handle
        if (decay != null) {
            w.muli(decay);
        }
        NDArray ratio;
        try (NDArray denom = v.sqrt()) {
            denom.divi(sqrtCorrection2).addi(epsilon);
            ratio = m.div(denom); // m / denom
        }
        try (NDArray r = ratio) {
            w.subi(r.muli(stepSize));
        }
    }
}
