package ai.djl.memopt.finetune;

import ai.djl.memopt.nn.Scalars;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.Arrays;

/**
 * The element-wise rules of {@link StatefulOptimizer}, on whatever piece of a parameter the caller hands over (a block
 * of rows, a whole parameter, a flat bucket of parameters): in place on the weight and the moments, autograd off by the
 * caller. Two forms of Adam/AdamW: {@link #adam} as a series of DJL operations (the CPU form, applied block by block),
 * and {@link #nativeAdam}, one native call ({@code JniUtils.adamUpdate}: about a dozen kernels queued from C++, the
 * scalars passed as arguments; the GPU form). The native call computes
 * {@code lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps sqrt(1 - b2^t))}, the same quotient as the class
 * documentation of {@link StatefulOptimizer} with numerator and denominator multiplied by {@code sqrt(1 - b2^t)}.
 *
 * <p>No operation takes a Java number as an operand: DJL uploads such a number from host memory, which on a GPU waits
 * for all queued work; the scalars are made on the device ({@link Scalars#like}).
 */
final class UpdateRules {

    private UpdateRules() {}

    /** One piece of the Adam/AdamW rule at step {@code step}, in place on views of the weight and moments. */
    static void adam(StatefulOptimizer o, long step, NDArray w, NDArray grad, NDArray first, NDArray second,
            NDManager tmp) {
        NDArray g = grad;
        boolean adamw = o.kind().decoupledDecay();
        float wd = o.weightDecay();
        if (!adamw && wd != 0) {
            NDArray decay = w.mul(scalar(w, wd, tmp));
            decay.attach(tmp);
            g = grad.add(decay);
            g.attach(tmp);
        }
        NDArray a = g.mul(scalar(g, 1 - o.beta1(), tmp));
        a.attach(tmp);
        first.muli(scalar(first, o.beta1(), tmp)).addi(a);
        NDArray sq = g.square();
        sq.attach(tmp);
        second.muli(scalar(second, o.beta2(), tmp)).addi(sq.muli(scalar(sq, 1 - o.beta2(), tmp)));
        double bc1 = 1 - Math.pow(o.beta1(), step);
        double bc2 = 1 - Math.pow(o.beta2(), step);
        if (adamw && wd != 0) {
            w.muli(scalar(w, 1 - o.learningRate() * wd, tmp));
        }
        NDArray denom = second.sqrt();
        denom.attach(tmp);
        denom.divi(scalar(denom, (float) Math.sqrt(bc2), tmp)).addi(scalar(denom, o.epsilon(), tmp));
        NDArray ratio = first.div(denom); // m / denom
        ratio.attach(tmp);
        w.subi(ratio.muli(scalar(ratio, (float) (o.learningRate() / bc1), tmp)));
    }

    /** One piece of SGD: {@code g += wd w; buf = mu buf + g (g at the first step); w -= lr buf}. */
    static void sgd(StatefulOptimizer o, NDArray w, NDArray grad, NDArray buf, boolean fresh, NDManager tmp) {
        NDArray g = grad;
        if (o.weightDecay() != 0) {
            NDArray decay = w.mul(scalar(w, o.weightDecay(), tmp));
            decay.attach(tmp);
            g = grad.add(decay);
            g.attach(tmp);
        }
        NDArray direction = g;
        if (buf != null) {
            if (fresh) {
                buf.set(new NDIndex("..."), g);
            } else {
                buf.muli(scalar(buf, o.momentum(), tmp)).addi(g);
            }
            direction = buf;
        }
        NDArray upd = direction.mul(scalar(direction, o.learningRate(), tmp));
        upd.attach(tmp);
        w.subi(upd);
    }

    /**
     * The Adam/AdamW update of {@code weight} (FP32) at step {@code step} in one native call, from the FP32 gradient
     * {@code g} divided by {@code gradDivisor} inside the call (see the class documentation).
     */
    static void nativeAdam(StatefulOptimizer o, long step, NDArray weight, NDArray g, NDArray first, NDArray second,
            float gradDivisor) {
        double bc1 = 1 - Math.pow(o.beta1(), step);
        double sqrtBc2 = Math.sqrt(1 - Math.pow(o.beta2(), step));
        float lr = o.learningRate();
        JniUtils.adamUpdate((PtNDArray) weight, (PtNDArray) g, (PtNDArray) first, (PtNDArray) second, lr,
                (float) (lr * sqrtBc2 / bc1), o.weightDecay(), 1f / gradDivisor, -1f, o.beta1(), o.beta2(),
                (float) (o.epsilon() * sqrtBc2), o.kind().decoupledDecay());
    }

    /**
     * A gradient piece in FP32 divided by {@code divisor}, in FP32 because the unscaled value may not be representable
     * in FP16. Never in place on the gradient: {@code toType} of an FP32 array returns the array itself.
     */
    static NDArray unscaled(NDArray grad, float divisor, NDManager tmp) {
        NDArray g = grad;
        if (g.getDataType() != DataType.FLOAT32) {
            g = g.toType(DataType.FLOAT32, false); // a new array
            g.attach(tmp);
            return divisor == 1f ? g : g.divi(scalar(g, divisor, tmp));
        }
        if (divisor != 1f) {
            g = g.div(scalar(g, divisor, tmp));
            g.attach(tmp);
        }
        return g;
    }

    /** Writes {@code source} into {@code target} (same shape) in {@code target}'s type: one converting copy. */
    static void copyInto(NDArray target, NDArray source, NDManager tmp) {
        if (target instanceof PtNDArray && source instanceof PtNDArray) {
            long[] shape = target.getShape().getShape();
            long[] step = new long[shape.length];
            Arrays.fill(step, 1);
            JniUtils.indexSet((PtNDArray) target, (PtNDArray) source, new long[shape.length], shape, step);
            return;
        }
        NDArray cast = source.toType(target.getDataType(), true);
        cast.attach(tmp);
        target.set(new NDIndex("..."), cast);
    }

    /** {@code value} as a 0-dimensional array of {@code like}'s type and device, made there (no host upload). */
    static NDArray scalar(NDArray like, double value, NDManager tmp) {
        NDArray s = Scalars.like(like, value);
        s.attach(tmp);
        return s;
    }
}
