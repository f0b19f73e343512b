package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.optimizer.Optimizer;
import com.google.common.base.Preconditions;
import java.util.LinkedHashMap;
import java.util.Locale;
import java.util.Map;

/**
 * Adam, AdamW (decoupled weight decay) and SGD (with optional momentum) as a DJL {@link Optimizer} whose state can be
 * read and restored, for training checkpoints. DJL's own {@code Adam} keeps its moments and update counts in private
 * maps (and detaches the moments from every manager, so only the garbage collector frees them): they can neither be
 * saved nor freed, hence this class.
 *
 * <p>The update rules are PyTorch's ({@code torch.optim.Adam/AdamW/SGD}, per-parameter step counts):
 * <pre>
 * Adam/AdamW: m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
 *             w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 *             AdamW first decays w *= 1 - lr wd; Adam adds wd w to g (L2)
 * SGD:        g += wd w;  buf = mu buf + g (buf = g at the first step);  w -= lr buf
 * </pre>
 * State arrays are FP32, live in the manager given to the builder (freed by {@link #close()}), and are keyed by the
 * DJL parameter id passed to {@link #update}. Weights are updated in place with autograd off, large ones in blocks of
 * rows so that no temporary is weight-sized (see {@link #update(String, NDArray, NDArray, float, NDArray)}).
 */
public final class StatefulOptimizer extends Optimizer implements AutoCloseable {

    /** The supported algorithms. */
    public enum Kind {
        ADAM,
        ADAMW,
        SGD;

        /** Parses {@code adam}, {@code adamw} or {@code sgd} (any case). */
        public static Kind parse(String name) {
            switch (name.trim().toLowerCase(Locale.ROOT)) {
                case "adam":
                    return ADAM;
                case "adamw":
                    return ADAMW;
                case "sgd":
                    return SGD;
                default:
                    throw new IllegalArgumentException("unknown optimizer '" + name + "': expected adam, adamw or sgd");
            }
        }
    }

    private final Kind kind;
    private final float beta1;
    private final float beta2;
    private final float epsilon;
    private final float weightDecay;
    private final float momentum;
    private final NDManager manager;
    private final Map<String, State> states = new LinkedHashMap<>();
    private final long blockElements;
    private float learningRate;

    private StatefulOptimizer(Builder b) {
        super(b);
        this.kind = b.kind;
        this.beta1 = b.beta1;
        this.beta2 = b.beta2;
        this.epsilon = b.epsilon;
        this.weightDecay = b.weightDecay;
        this.momentum = b.momentum;
        this.learningRate = b.learningRate;
        this.manager = b.manager;
        this.blockElements = b.blockElements;
    }

    public static Builder builder() {
        return new Builder();
    }

    public Kind kind() {
        return kind;
    }

    public float beta1() {
        return beta1;
    }

    public float beta2() {
        return beta2;
    }

    public float epsilon() {
        return epsilon;
    }

    public float weightDecay() {
        return weightDecay;
    }

    public float momentum() {
        return momentum;
    }

    /** The learning rate of the next update. */
    public float learningRate() {
        return learningRate;
    }

    /** Sets the learning rate of the next updates (a schedule calls this before each step). */
    public void setLearningRate(float lr) {
        Preconditions.checkArgument(lr >= 0 && Float.isFinite(lr), "learning rate must be finite and >= 0, got %s", lr);
        this.learningRate = lr;
    }

    /** {@inheritDoc} */
    @Override
    public void update(String parameterId, NDArray weight, NDArray grad) {
        update(parameterId, weight, grad, 1f, null);
    }

    /**
     * Updates an FP32 weight (the master in mixed precision) from a gradient of any floating type divided by
     * {@code gradDivisor} (the loss scale; 1 for none), and, when {@code copyTo} is given, writes the updated weight
     * into it in {@code copyTo}'s type (the FP16 working copy). Large parameters are processed in blocks of rows of at
     * most {@link Builder#optBlockElements} elements, each gradient block widened, unscaled, applied and copied back
     * before the next, so the temporaries are block-sized instead of weight-sized (a 32000 x 1024 embedding would
     * otherwise need 131 MB per temporary). The rules are element-wise, so the result is the same as one whole-array
     * update.
     *
     * @throws IllegalArgumentException if the weight is not FP32 or the shapes differ
     */
    public void update(String parameterId, NDArray weight, NDArray grad, float gradDivisor, NDArray copyTo) {
        Preconditions.checkArgument(weight.getDataType() == DataType.FLOAT32,
                "StatefulOptimizer updates FP32 weights (FP32 masters in mixed precision); %s is %s", parameterId,
                weight.getDataType());
        Preconditions.checkArgument(grad.getShape().equals(weight.getShape()),
                "gradient of %s has shape %s, the weight %s", parameterId, grad.getShape(), weight.getShape());
        Preconditions.checkArgument(copyTo == null || copyTo.getShape().equals(weight.getShape()),
                "working copy of %s has shape %s, the weight %s", parameterId,
                copyTo == null ? null : copyTo.getShape(), weight.getShape());
        Preconditions.checkArgument(gradDivisor > 0 && Float.isFinite(gradDivisor),
                "gradient divisor of %s must be finite and > 0, got %s", parameterId, gradDivisor);
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(false); // in-place writes into leaves that require grad
        try {
            State s = states.computeIfAbsent(parameterId, k -> new State());
            s.step++;
            boolean adam = kind != Kind.SGD;
            if (adam && s.first == null) {
                s.first = zeros(weight);
                s.second = zeros(weight);
            }
            boolean freshMomentum = !adam && momentum != 0 && s.first == null;
            if (freshMomentum) {
                s.first = zeros(weight); // filled with the first direction below, as torch's buf = g.clone()
            }
            long rows = RowBlocks.rowsPerBlock(weight.getShape(), blockElements);
            long total = weight.getShape().dimension() == 0 ? 1 : weight.getShape().get(0);
            for (long r0 = 0; r0 < total; r0 += rows) {
                long r1 = Math.min(total, r0 + rows);
                try (NDManager b = manager.newSubManager(weight.getDevice())) {
                    NDArray w = RowBlocks.rows(weight, r0, r1, rows, total, b);
                    NDArray g = RowBlocks.rows(grad, r0, r1, rows, total, b);
                    g = unscaled(g, gradDivisor, b);
                    NDArray first = s.first == null ? null : RowBlocks.rows(s.first, r0, r1, rows, total, b);
                    if (adam) {
                        adam(s.step, w, g, first, RowBlocks.rows(s.second, r0, r1, rows, total, b), b);
                    } else {
                        sgd(w, g, first, freshMomentum, b);
                    }
                    if (copyTo != null) {
                        NDArray target = RowBlocks.rows(copyTo, r0, r1, rows, total, b);
                        NDArray cast = w.toType(copyTo.getDataType(), true);
                        cast.attach(b);
                        target.set(new NDIndex("..."), cast);
                    }
                }
            }
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }

    /**
     * A gradient block in FP32 divided by {@code divisor}, in FP32 because the unscaled value may not be representable
     * in FP16. Never in place on the gradient: {@code toType} of an FP32 array returns the array itself.
     */
    private static NDArray unscaled(NDArray grad, float divisor, NDManager tmp) {
        NDArray g = grad;
        if (g.getDataType() != DataType.FLOAT32) {
            g = g.toType(DataType.FLOAT32, false); // a new array
            g.attach(tmp);
            return divisor == 1f ? g : g.divi(divisor);
        }
        if (divisor != 1f) {
            g = g.div(divisor);
            g.attach(tmp);
        }
        return g;
    }

    /** One block of the Adam/AdamW rule, in place on views of the weight and moments. */
    private void adam(long step, NDArray w, NDArray grad, NDArray first, NDArray second, NDManager tmp) {
        NDArray g = grad;
        if (kind == Kind.ADAM && weightDecay != 0) {
            NDArray wd = w.mul(weightDecay);
            wd.attach(tmp);
            g = grad.add(wd);
            g.attach(tmp);
        }
        NDArray a = g.mul(1 - beta1);
        a.attach(tmp);
        first.muli(beta1).addi(a);
        NDArray sq = g.square();
        sq.attach(tmp);
        second.muli(beta2).addi(sq.muli(1 - beta2));
        double bc1 = 1 - Math.pow(beta1, step);
        double bc2 = 1 - Math.pow(beta2, step);
        if (kind == Kind.ADAMW && weightDecay != 0) {
            w.muli(1 - learningRate * weightDecay);
        }
        NDArray upd = second.sqrt();
        upd.attach(tmp);
        upd.divi((float) Math.sqrt(bc2)).addi(epsilon).powi(-1).muli(first); // m / denom
        w.subi(upd.muli((float) (learningRate / bc1)));
    }

    /** One block of SGD: {@code g += wd w; buf = mu buf + g (g at the first step); w -= lr buf}. */
    private void sgd(NDArray w, NDArray grad, NDArray buf, boolean fresh, NDManager tmp) {
        NDArray g = grad;
        if (weightDecay != 0) {
            NDArray wd = w.mul(weightDecay);
            wd.attach(tmp);
            g = grad.add(wd);
            g.attach(tmp);
        }
        NDArray direction = g;
        if (buf != null) {
            if (fresh) {
                buf.set(new NDIndex("..."), g);
            } else {
                buf.muli(momentum).addi(g);
            }
            direction = buf;
        }
        NDArray upd = direction.mul(learningRate);
        upd.attach(tmp);
        w.subi(upd);
    }

    private NDArray zeros(NDArray like) {
        return manager.zeros(like.getShape(), DataType.FLOAT32, like.getDevice());
    }

    /** Number of updates applied to a parameter (0 if never). */
    public long stepCount(String parameterId) {
        State s = states.get(parameterId);
        return s == null ? 0 : s.step;
    }

    /** The state arrays of a parameter by kind ({@code exp_avg}, {@code exp_avg_sq}, {@code momentum_buffer}). */
    public Map<String, NDArray> stateArrays(String parameterId) {
        State s = states.get(parameterId);
        Map<String, NDArray> out = new LinkedHashMap<>();
        if (s == null || s.first == null) {
            return out;
        }
        if (kind == Kind.SGD) {
            out.put("momentum_buffer", s.first);
        } else {
            out.put("exp_avg", s.first);
            out.put("exp_avg_sq", s.second);
        }
        return out;
    }

    /**
     * Restores the state of a parameter: the arrays are copied into new arrays of this optimizer's manager, so the
     * caller may close or reuse them.
     *
     * @param arrays by kind as {@link #stateArrays} names them; empty for a parameter without moments
     * @throws IllegalArgumentException naming the parameter and the missing or misshaped array
     */
    public void restore(String parameterId, String name, long step, Map<String, NDArray> arrays, NDArray weight) {
        Preconditions.checkArgument(step >= 0, "optimizer state of %s: negative step %s", name, step);
        State s = new State();
        s.step = step;
        String[] keys = kind == Kind.SGD ? new String[] {"momentum_buffer"} : new String[] {"exp_avg", "exp_avg_sq"};
        boolean needed = step > 0 && (kind != Kind.SGD || momentum != 0);
        if (needed) {
            for (int i = 0; i < keys.length; i++) {
                NDArray a = arrays.get(keys[i]);
                Preconditions.checkArgument(a != null, "optimizer state of %s has no %s (step %s)", name, keys[i], step);
                Preconditions.checkArgument(a.getShape().equals(weight.getShape()),
                        "optimizer state %s.%s has shape %s, the parameter %s", name, keys[i], a.getShape(),
                        weight.getShape());
                // a copy into memory of this optimizer's own: toType(FLOAT32, true) of an FP32 array is an alias in
                // DJL's PyTorch engine, and the arrays a restore gets are loaded over Java direct buffers that the
                // garbage collector frees once their manager is closed (later updates wrote into freed memory)
                NDArray copy = zeros(weight);
                copy.set(new NDIndex("..."), a);
                if (i == 0) {
                    s.first = copy;
                } else {
                    s.second = copy;
                }
            }
        }
        State old = states.put(parameterId, s);
        if (old != null) {
            old.close();
        }
    }

    /** Bytes held by the state arrays. */
    public long stateBytes() {
        long n = 0;
        for (State s : states.values()) {
            n += bytes(s.first) + bytes(s.second);
        }
        return n;
    }

    private static long bytes(NDArray a) {
        return a == null ? 0 : a.size() * a.getDataType().getNumOfBytes();
    }

    /** Frees the state arrays. */
    @Override
    public void close() {
        for (State s : states.values()) {
            s.close();
        }
        states.clear();
    }

    private static final class State {
        long step;
        NDArray first;
        NDArray second;

        void close() {
            if (first != null) {
                first.close();
            }
            if (second != null) {
                second.close();
            }
        }
    }

    /** Builder: {@code setManager} required; defaults Adam-like betas (0.9, 0.999), eps 1e-8, lr 1e-3, no decay. */
    public static final class Builder extends OptimizerBuilder<Builder> {
        private Kind kind = Kind.ADAMW;
        private float learningRate = 1e-3f;
        private float beta1 = 0.9f;
        private float beta2 = 0.999f;
        private float epsilon = 1e-8f;
        private float weightDecay;
        private float momentum;
        private NDManager manager;
        private long blockElements = RowBlocks.DEFAULT_BLOCK_ELEMENTS;

        private Builder() {}

        @Override
        protected Builder self() {
            return this;
        }

        /** Where the state arrays are allocated (its device is irrelevant: each lives on its weight's device). */
        public Builder setManager(NDManager manager) {
            this.manager = manager;
            return this;
        }

        public Builder optKind(Kind kind) {
            this.kind = Preconditions.checkNotNull(kind, "kind");
            return this;
        }

        public Builder optLearningRate(float lr) {
            this.learningRate = lr;
            return this;
        }

        public Builder optBetas(float beta1, float beta2) {
            this.beta1 = beta1;
            this.beta2 = beta2;
            return this;
        }

        public Builder optEpsilon(float epsilon) {
            this.epsilon = epsilon;
            return this;
        }

        /** Decoupled decay for AdamW, L2 added to the gradient for Adam and SGD. */
        public Builder optWeightDecay(float weightDecay) {
            this.weightDecay = weightDecay;
            return this;
        }

        /** SGD momentum (0 = plain SGD). */
        public Builder optMomentum(float momentum) {
            this.momentum = momentum;
            return this;
        }

        /**
         * The largest block of a parameter updated at once, in elements (default 2^20: 4 MB FP32 temporaries); larger
         * parameters are updated in blocks of whole rows (dimension 0).
         */
        public Builder optBlockElements(long elements) {
            this.blockElements = elements;
            return this;
        }

        public StatefulOptimizer build() {
            Preconditions.checkArgument(blockElements >= 1, "block elements must be >= 1, got %s", blockElements);
            Preconditions.checkArgument(manager != null, "StatefulOptimizer needs a manager: call setManager");
            Preconditions.checkArgument(learningRate >= 0 && Float.isFinite(learningRate),
                    "learning rate must be finite and >= 0, got %s", learningRate);
            Preconditions.checkArgument(beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got %s", beta1);
            Preconditions.checkArgument(beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got %s", beta2);
            Preconditions.checkArgument(epsilon > 0, "epsilon must be > 0, got %s", epsilon);
            Preconditions.checkArgument(weightDecay >= 0, "weight decay must be >= 0, got %s", weightDecay);
            Preconditions.checkArgument(momentum >= 0 && momentum < 1, "momentum must be in [0, 1), got %s",
                    momentum);
            return new StatefulOptimizer(this);
        }
    }
}
