package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.optimizer.Optimizer;
import com.google.common.base.Preconditions;
import java.util.LinkedHashMap;
import java.util.List;
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
 *
 * <p>On a GPU (or with {@link Builder#optWholeParameter}) each parameter is instead updated whole, Adam and AdamW by
 * one native call ({@link UpdateRules#nativeAdam}), since there the row blocks only multiply the kernel launches and
 * the device has the memory for parameter-sized temporaries; {@link #updateAll} goes further and updates flat buckets
 * of parameters at once ({@link AdamBuckets}). The formulas themselves are in {@link UpdateRules}.
 */
public final class StatefulOptimizer extends Optimizer implements AutoCloseable {

    /** The supported algorithms. */
    public enum Kind {
        ADAM,
        ADAMW,
        /** AdamW with both moments in 8 bits, block-wise ({@link EightBitAdamW}). */
        ADAMW8BIT,
        SGD;

        /** Whether weight decay is decoupled (AdamW) rather than added to the gradient (Adam, SGD). */
        boolean decoupledDecay() {
            return this == ADAMW || this == ADAMW8BIT;
        }

        /** Parses {@code adam}, {@code adamw}, {@code adamw8bit} or {@code sgd} (any case). */
        public static Kind parse(String name) {
            switch (name.trim().toLowerCase(Locale.ROOT)) {
                case "adam":
                    return ADAM;
                case "adamw":
                    return ADAMW;
                case "adamw8bit":
                case "adamw-8bit":
                    return ADAMW8BIT;
                case "sgd":
                    return SGD;
                default:
                    throw new IllegalArgumentException("unknown optimizer '" + name + "': expected adam, adamw, adamw8bit or sgd");
            }
        }
    }

    private final Kind kind;
    private final float beta1;
    private final float beta2;
    private final float epsilon;
    private final float weightDecay;
    private final float momentum;
    final NDManager manager;
    final Map<String, OptimizerState> states = new LinkedHashMap<>();
    private final long blockElements;
    private final Boolean wholeParameter; // null: whole parameters on a GPU
    private final long bucketElements;
    private final AdamBuckets buckets = new AdamBuckets();
    private final EightBitAdamW eightBit; // the moments of ADAMW8BIT, null for the other kinds
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
        this.wholeParameter = b.wholeParameter;
        this.bucketElements = b.bucketElements;
        this.eightBit = kind != Kind.ADAMW8BIT ? null : EightBitAdamW.builder().setManager(manager)
                .optLearningRate(learningRate).optBetas(beta1, beta2).optEpsilon(epsilon).optWeightDecay(weightDecay)
                .optBlockSize(b.eightBitBlock).optMinQuantizedSize(b.eightBitMinSize).build();
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
        if (eightBit != null) {
            eightBit.setLearningRate(lr);
        }
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
        if (eightBit != null) {
            eightBit.step(parameterId, weight, grad, gradDivisor, copyTo); // block by block, 8-bit moments
            return;
        }
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(false); // in-place writes into leaves that require grad
        try {
            OptimizerState s = states.computeIfAbsent(parameterId, k -> new OptimizerState());
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
            boolean whole = wholeParameter(weight);
            if (whole && adam && weight instanceof PtNDArray) {
                nativeAdam(s, weight, grad, gradDivisor, copyTo);
                return;
            }
            long rows = whole ? Long.MAX_VALUE : RowBlocks.rowsPerBlock(weight.getShape(), blockElements);
            long total = weight.getShape().dimension() == 0 ? 1 : weight.getShape().get(0);
            for (long r0 = 0; r0 < total; r0 += rows) {
                long r1 = Math.min(total, r0 + rows);
                try (NDManager b = manager.newSubManager(weight.getDevice())) {
                    NDArray w = RowBlocks.rows(weight, r0, r1, rows, total, b);
                    NDArray g = UpdateRules.unscaled(RowBlocks.rows(grad, r0, r1, rows, total, b), gradDivisor, b);
                    NDArray first = s.first == null ? null : RowBlocks.rows(s.first, r0, r1, rows, total, b);
                    if (adam) {
                        UpdateRules.adam(this, s.step, w, g, first, RowBlocks.rows(s.second, r0, r1, rows, total, b),
                                b);
                    } else {
                        UpdateRules.sgd(this, w, g, first, freshMomentum, b);
                    }
                    if (copyTo != null) {
                        UpdateRules.copyInto(RowBlocks.rows(copyTo, r0, r1, rows, total, b), w, b);
                    }
                }
            }
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }

    /** Whether {@code weight} is updated whole rather than in blocks of rows (see {@link Builder#optWholeParameter}). */
    private boolean wholeParameter(NDArray weight) {
        return wholeParameter != null ? wholeParameter : weight.getDevice().isGpu();
    }

    /**
     * The whole-parameter Adam/AdamW update in one native call; the gradient is widened to FP32 first when it is not
     * FP32, and unscaled in FP32 inside the call.
     */
    private void nativeAdam(OptimizerState s, NDArray weight, NDArray grad, float gradDivisor, NDArray copyTo) {
        try (NDManager b = manager.newSubManager(weight.getDevice())) {
            NDArray g = grad;
            if (g.getDataType() != DataType.FLOAT32) {
                g = grad.toType(DataType.FLOAT32, false);
                g.attach(b);
            }
            UpdateRules.nativeAdam(this, s.step, weight, g, s.first, s.second, gradDivisor);
            if (copyTo != null) {
                UpdateRules.copyInto(copyTo, weight, b);
            }
        }
    }

    /**
     * Updates many parameters at once: Adam and AdamW run on flat buckets of parameters of about
     * {@link Builder#optBucketElements} elements each (their gradients, and the FP32 weights, concatenated; the moments
     * of a bucket live in one flat array whose pieces are the per-parameter state arrays), one native update per
     * bucket, then each updated weight is copied back, into {@code copyTo} too when given. Per parameter that leaves a
     * few native calls instead of a dozen kernels and their Java operations, which on a GPU decided the optimizer's
     * time. The result is element for element the whole-parameter update's. SGD, parameters whose step counts differ
     * within a bucket, and parameters on the CPU (unless {@link Builder#optWholeParameter} is true) are updated one by
     * one ({@link #update(String, NDArray, NDArray, float, NDArray)}). 8-bit AdamW has buckets of its own, of whole
     * quantization blocks ({@link EightBitAdamW#stepAll}), with the same bits as its per-parameter update.
     *
     * @param ids the DJL parameter ids, in a stable order (the buckets are planned for the first list and rebuilt when
     *     it changes)
     * @param weights the FP32 weights (masters), updated in place
     * @param grads their gradients (FP32 or FP16), divided by {@code gradDivisor}
     * @param copyTo null, or per parameter null or the working copy to receive the updated weight in its own type
     */
    public void updateAll(List<String> ids, List<NDArray> weights, List<NDArray> grads, float gradDivisor,
            List<NDArray> copyTo) {
        updateAll(ids, weights, grads, gradDivisor, copyTo, ids.isEmpty() || wholeParameter(weights.get(0)));
    }

    /** {@link #updateAll} with the choice between buckets and per-parameter updates made by the caller. */
    void updateAll(List<String> ids, List<NDArray> weights, List<NDArray> grads, float gradDivisor,
            List<NDArray> copyTo, boolean bucketed) {
        Preconditions.checkArgument(ids.size() == weights.size() && ids.size() == grads.size()
                && (copyTo == null || copyTo.size() == ids.size()), "updateAll: %s ids, %s weights, %s gradients%s",
                ids.size(), weights.size(), grads.size(), copyTo == null ? "" : ", " + copyTo.size() + " copies");
        if (eightBit != null && bucketed) {
            eightBit.stepAll(ids, weights, grads, gradDivisor, copyTo); // buckets of 8-bit or FP32 moments
            return;
        }
        if (kind == Kind.SGD || eightBit != null || !bucketed) {
            for (int i = 0; i < ids.size(); i++) {
                update(ids.get(i), weights.get(i), grads.get(i), gradDivisor, copyTo == null ? null : copyTo.get(i));
            }
            return;
        }
        if (!buckets.isCurrent(this, ids, weights, grads)) {
            buckets.plan(this, ids, weights, grads, bucketElements);
        }
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(false);
        try {
            buckets.update(this, weights, grads, gradDivisor, copyTo);
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }

    /** The 8-bit moments of ADAMW8BIT, or null. */
    EightBitAdamW eightBit() {
        return eightBit;
    }

    private NDArray zeros(NDArray like) {
        return manager.zeros(like.getShape(), DataType.FLOAT32, like.getDevice());
    }

    /** Number of updates applied to a parameter (0 if never). */
    public long stepCount(String parameterId) {
        if (eightBit != null) {
            return eightBit.stepCount(parameterId);
        }
        OptimizerState s = states.get(parameterId);
        return s == null ? 0 : s.step;
    }

    /** The state arrays of a parameter by kind ({@code exp_avg}, {@code exp_avg_sq}, {@code momentum_buffer}). */
    public Map<String, NDArray> stateArrays(String parameterId) {
        if (eightBit != null) { // exp_avg.code, exp_avg.absmax, ... (FP32 exp_avg, exp_avg_sq below the size threshold)
            return eightBit.stateArrays(parameterId);
        }
        OptimizerState s = states.get(parameterId);
        return s == null ? new LinkedHashMap<>() : s.arrays(kind == Kind.SGD);
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
        if (eightBit != null) {
            eightBit.restore(parameterId, name, step, arrays, weight); // copies, never aliases
            return;
        }
        boolean needed = step > 0 && (kind != Kind.SGD || momentum != 0);
        OptimizerState s = OptimizerState.restored(name, step, arrays, weight, kind == Kind.SGD, needed, manager);
        OptimizerState old = states.put(parameterId, s);
        if (old != null) {
            old.close();
        }
        buckets.close(); // replanned, with the restored moments copied in, at the next updateAll
    }

    /** Bytes held by the state arrays. */
    public long stateBytes() {
        long n = 0;
        for (OptimizerState s : states.values()) {
            n += s.bytes();
        }
        if (eightBit != null) {
            n += eightBit.stateBytes();
        }
        return n;
    }

    /** Frees the state arrays. */
    @Override
    public void close() {
        buckets.close();
        if (eightBit != null) {
            eightBit.close();
        }
        for (OptimizerState s : states.values()) {
            s.close();
        }
        states.clear();
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
        private Boolean wholeParameter;
        private long bucketElements = 1L << 24;
        private int eightBitBlock = 256;
        private long eightBitMinSize = 4096;

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

        /**
         * Whether each parameter is updated whole, Adam and AdamW in one native call ({@link UpdateRules#nativeAdam}),
         * instead of in blocks of rows. Default: on a GPU yes, on the CPU no (the blocks keep its temporaries small).
         */
        public Builder optWholeParameter(boolean whole) {
            this.wholeParameter = whole;
            return this;
        }

        /**
         * The size of the buckets of {@link StatefulOptimizer#updateAll} in elements (default 2^24: 64 MB FP32
         * temporaries per bucket, a handful of buckets for a model of a few hundred million parameters).
         */
        public Builder optBucketElements(long elements) {
            this.bucketElements = elements;
            return this;
        }

        /**
         * adamw8bit: elements per quantization block (default 256) and the size below which a parameter keeps FP32
         * moments (default 4096); see {@link EightBitAdamW}.
         */
        public Builder optEightBit(int blockSize, long minQuantizedSize) {
            this.eightBitBlock = blockSize;
            this.eightBitMinSize = minQuantizedSize;
            return this;
        }

        public StatefulOptimizer build() {
            Preconditions.checkArgument(bucketElements >= 1, "bucket elements must be >= 1, got %s", bucketElements);
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
