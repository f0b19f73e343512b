package ai.djl.memopt.finetune;

import ai.djl.Device;
import ai.djl.memopt.nn.Scalars;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.pytorch.jni.JniUtils;
import com.google.common.base.Preconditions;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * AdamW whose two moments are stored in 8 bits with one FP32 scale per block of elements: block-wise dynamic
 * quantization after Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization" (bitsandbytes'
 * {@code AdamW8bit}), for 2 bytes of optimizer state per parameter instead of 8.
 *
 * <p>State of a parameter of {@code n} elements, {@code blocks = ceil(n / B)}:
 * <pre>
 * exp_avg.code      (n)      UINT8  first moment: index into the signed dynamic code
 * exp_avg.absmax    (blocks) FP32   its absolute maximum per block of B consecutive elements (flattened order)
 * exp_avg_sq.code   (n)      UINT8  second moment: index into the unsigned dynamic code
 * exp_avg_sq.absmax (blocks) FP32
 * </pre>
 * A parameter with fewer than {@link Builder#optMinQuantizedSize} elements (norms, biases, small adapters) keeps FP32
 * {@code exp_avg} and {@code exp_avg_sq} of its own shape, as bitsandbytes' {@code min_8bit_size} does: quantizing
 * them would save almost nothing and their moments vary the most.
 *
 * <p>The code is bitsandbytes' dynamic tree ({@link BlockwiseCode}): each decade from 1e-7 to 1 of the value relative
 * to its block's maximum keeps some entries, so the second moment, which spans many orders of magnitude inside one
 * block, keeps small values instead of rounding them to zero; the second moment uses the unsigned variant (it is never
 * negative), which has twice the entries per decade. The block size B defaults to 256, bitsandbytes' current value
 * (2048, the paper's, is {@link Builder#optBlockSize}): one outlier only coarsens its own block, and the scales cost
 * 4 / 256 bytes per element and moment (1.6 %). On the demo model's 300-step quality run the held-out loss of 8-bit
 * AdamW was 1.0 % below AdamW's with blocks of 256 and 1.3 % above it with blocks of 2048 (docs/benchmarks.md).
 *
 * <p>The rule is {@link StatefulOptimizer}'s AdamW (PyTorch's, per-parameter step counts), with the same FP32
 * operations in the same order, so the FP32 path gives the same bits:
 * <pre>
 * w *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
 * w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * </pre>
 * The 8-bit path, like bitsandbytes' kernel, dequantizes the stored moments, applies the rule, updates the weight with
 * the new FP32 moments and only then quantizes them for storage. It walks the flattened weight in chunks of whole
 * blocks (at most {@link Builder#optChunkElements} elements: by default 2^20 on the CPU, where memory is the point,
 * 2^23 on a GPU, where every chunk's few dozen operations cost host time), each chunk's dequantized moments and
 * temporaries (about 33 bytes per element, {@link EightBitStep}) closed before the next, so no FP32 array the size of a
 * large weight ever exists. {@link #stepAll} goes further and updates buckets of parameters laid end to end as one
 * chunk ({@link EightBitBuckets}). Requantizing costs a dozen element-wise operations per moment
 * ({@link BlockwiseCode.OnDevice#encode}). All work is NDArray operations on the weight's device; nothing is read to
 * the host.
 *
 * <pre>{@code
 * try (EightBitAdamW opt = EightBitAdamW.builder().setManager(manager).optLearningRate(1e-4f)
 *         .optWeightDecay(0.01f).build()) {
 *     opt.step("layers.0.mlp.up_proj.weight", master, grad);             // FP32 master, gradient of any float type
 *     opt.step(id, master, fp16Grad, lossScale, fp16Working);            // unscale, update, copy to FP16 weights
 *     Map<String, NDArray> saved = opt.stateArrays(id);                   // for a checkpoint, with stepCount(id)
 *     opt.restore(id, name, step, loaded, master);                        // copies the loaded arrays
 * }
 * }</pre>
 */
public final class EightBitAdamW implements AutoCloseable {

    static final String EXP_AVG = "exp_avg";
    static final String EXP_AVG_SQ = "exp_avg_sq";
    static final String CODE = ".code";
    static final String ABSMAX = ".absmax";
    /** The name of the step-count array in {@link #saveState}'s list. */
    public static final String STEP = "step";

    private final float beta1;
    private final float beta2;
    private final float epsilon;
    private final float weightDecay;
    private final int blockSize;
    private final long minQuantizedSize;
    /** Chunk elements set by the builder, or 0 for the device's default. */
    private final long chunkElements;
    private final boolean searchEncode;
    final NDManager manager;
    final Map<String, MomentState> states = new LinkedHashMap<>();
    private final Map<Device, BlockwiseCode.OnDevice[]> codes = new HashMap<>();
    private final Map<Device, NDList> constants = new HashMap<>();
    private final EightBitBuckets buckets = new EightBitBuckets(this);
    private float learningRate;

    private EightBitAdamW(Builder b) {
        this.beta1 = b.beta1;
        this.beta2 = b.beta2;
        this.epsilon = b.epsilon;
        this.weightDecay = b.weightDecay;
        this.blockSize = b.blockSize;
        this.minQuantizedSize = b.minQuantizedSize;
        this.chunkElements = b.chunkElements == null ? 0 : b.chunkElements;
        this.searchEncode = b.searchEncode;
        this.learningRate = b.learningRate;
        this.manager = b.manager;
    }

    public static Builder builder() {
        return new Builder();
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

    /** Elements per quantization block (one FP32 scale each). */
    public int blockSize() {
        return blockSize;
    }

    /** Parameters with fewer elements keep FP32 moments. */
    public long minQuantizedSize() {
        return minQuantizedSize;
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

    /** The most elements updated at once on {@code device} (see {@link Builder#optChunkElements}). */
    public long chunkElements(Device device) {
        if (chunkElements >= 1) {
            return chunkElements;
        }
        return device.isGpu() ? Builder.GPU_CHUNK_ELEMENTS : Builder.CPU_CHUNK_ELEMENTS;
    }

    /** {@link #chunkElements} in whole blocks, at least one. */
    long chunkBlocks(Device device) {
        return Math.max(1, chunkElements(device) / blockSize);
    }

    /** Whether a parameter of {@code elements} elements gets 8-bit moments. */
    public boolean quantizes(long elements) {
        return elements >= minQuantizedSize;
    }

    /** Updates an FP32 weight in place from an unscaled gradient: {@code step(id, master, grad, 1, null)}. */
    public void step(String parameterId, NDArray master, NDArray grad) {
        step(parameterId, master, grad, 1f, null);
    }

    /**
     * One AdamW step of the FP32 weight {@code master}, in place, from {@code grad / gradDivisor} ({@code grad} of any
     * floating type, for example the FP16 gradient of a loss scaled by {@code gradDivisor}); when {@code copyTo} is
     * given, the updated weight is also written into it in its own type (the FP16 working copy). The gradient must be
     * finite (callers check for overflow first, as {@link ParameterUpdate} does).
     *
     * @param parameterId the key of the state (the DJL parameter id)
     * @throws IllegalArgumentException naming the parameter if the master is not FP32, shapes or devices differ, or the
     *     shape differs from the one the state was made for
     */
    public void step(String parameterId, NDArray master, NDArray grad, float gradDivisor, NDArray copyTo) {
        checkInputs(parameterId, master, grad, gradDivisor, copyTo);
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(false); // in-place writes into leaves that require grad
        try (NDManager scope = manager.newSubManager(master.getDevice())) {
            MomentState s = state(parameterId, master);
            s.step++;
            EightBitStep.run(this, s, flat(master, scope), flat(grad, scope),
                    copyTo == null ? null : flat(copyTo, scope), gradDivisor, chunkBlocks(master.getDevice()), scope);
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }

    /**
     * Updates many parameters at once, as {@link #step(String, NDArray, NDArray, float, NDArray)} would one by one
     * (the same bits): consecutive parameters of one device and gradient type are laid end to end in buckets of at
     * most {@link #chunkElements} elements and each bucket is updated as one chunk ({@link EightBitBuckets}); quantized
     * parameters join a bucket when their size is a multiple of the block size (blocks then never straddle two
     * parameters, so each one's state arrays are unchanged, views of the bucket's), FP32-moment ones always. Larger
     * parameters, and those whose step counts differ from their bucket's, are updated alone. The buckets are planned
     * once per list of ids and kept while the weights and states are the ones planned for.
     *
     * @param copyTo null, or per parameter null or the working copy that receives the updated weight
     */
    public void stepAll(List<String> ids, List<NDArray> masters, List<NDArray> grads, float gradDivisor,
            List<NDArray> copyTo) {
        Preconditions.checkArgument(ids.size() == masters.size() && ids.size() == grads.size()
                && (copyTo == null || copyTo.size() == ids.size()), "stepAll: %s ids, %s weights, %s gradients%s",
                ids.size(), masters.size(), grads.size(), copyTo == null ? "" : ", " + copyTo.size() + " copies");
        for (int i = 0; i < ids.size(); i++) {
            checkInputs(ids.get(i), masters.get(i), grads.get(i), gradDivisor, copyTo == null ? null : copyTo.get(i));
        }
        boolean gradMode = JniUtils.isGradMode();
        JniUtils.setGradMode(false);
        try {
            buckets.update(ids, masters, grads, gradDivisor, copyTo);
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }

    /** The number of buckets planned for this list of ids by {@link #stepAll} (0 if none). */
    int bucketCount(List<String> ids) {
        return buckets.bucketCount(ids);
    }

    /** The state of a parameter, made (zero moments) at its first update; its shape checked against the weight's. */
    MomentState state(String parameterId, NDArray master) {
        MomentState s = states.get(parameterId);
        if (s == null) {
            s = MomentState.fresh(master, quantizes(master.size()), blockSize, manager, codes(master.getDevice()));
            states.put(parameterId, s);
        }
        Preconditions.checkArgument(s.shape.equals(master.getShape()),
                "parameter %s has shape %s, its optimizer state was made for %s", parameterId, master.getShape(),
                s.shape);
        return s;
    }

    private static void checkInputs(String id, NDArray master, NDArray grad, float gradDivisor, NDArray copyTo) {
        Preconditions.checkArgument(master.getDataType() == DataType.FLOAT32,
                "EightBitAdamW updates FP32 weights (FP32 masters in mixed precision); %s is %s", id,
                master.getDataType());
        Preconditions.checkArgument(grad.getShape().equals(master.getShape()),
                "gradient of %s has shape %s, the weight %s", id, grad.getShape(), master.getShape());
        Preconditions.checkArgument(grad.getDataType().isFloating(),
                "gradient of %s must be floating point, got %s", id, grad.getDataType());
        Preconditions.checkArgument(grad.getDevice().equals(master.getDevice()),
                "gradient of %s is on %s, the weight on %s", id, grad.getDevice(), master.getDevice());
        Preconditions.checkArgument(copyTo == null || copyTo.getShape().equals(master.getShape()),
                "working copy of %s has shape %s, the weight %s", id, copyTo == null ? null : copyTo.getShape(),
                master.getShape());
        Preconditions.checkArgument(gradDivisor > 0 && Float.isFinite(gradDivisor),
                "gradient divisor of %s must be finite and > 0, got %s", id, gradDivisor);
    }

    /** A flat view of a contiguous array (in-place writes reach the array), attached to {@code scope}. */
    private static NDArray flat(NDArray a, NDManager scope) {
        NDArray view = a.reshape(-1);
        view.attach(scope);
        return view;
    }

    /** The code tables on {@code device} (signed, unsigned), uploaded once. */
    BlockwiseCode.OnDevice[] codes(Device device) {
        return codes.computeIfAbsent(device, d -> new BlockwiseCode.OnDevice[] {
            BlockwiseCode.signedDynamic().upload(manager, d, searchEncode),
            BlockwiseCode.unsignedDynamic().upload(manager, d, searchEncode)});
    }

    /**
     * The rule's fixed scalars on {@code device}, made once: {@code 1 - beta1, beta1, beta2, 1 - beta2, epsilon} (FP32,
     * from the same float expressions as {@link UpdateRules#adam}).
     */
    NDArray[] constants(Device device) {
        NDList c = constants.computeIfAbsent(device, d -> {
            NDList list = new NDList();
            try (NDArray like = manager.zeros(new Shape(), DataType.FLOAT32, d)) {
                for (float v : new float[] {1 - beta1, beta1, beta2, 1 - beta2, epsilon}) {
                    NDArray s = Scalars.like(like, v);
                    s.attach(manager);
                    list.add(s);
                }
            }
            return list;
        });
        return c.toArray(new NDArray[0]);
    }

    /** Number of updates applied to a parameter (0 if never). */
    public long stepCount(String parameterId) {
        MomentState s = states.get(parameterId);
        return s == null ? 0 : s.step;
    }

    /** Whether a parameter's moments are stored in 8 bits (false also when it has no state yet). */
    public boolean isQuantized(String parameterId) {
        MomentState s = states.get(parameterId);
        return s != null && s.quantized;
    }

    /**
     * The live state arrays of a parameter by name: {@code exp_avg.code}, {@code exp_avg.absmax},
     * {@code exp_avg_sq.code}, {@code exp_avg_sq.absmax} when quantized, else {@code exp_avg} and {@code exp_avg_sq};
     * empty if the parameter has no state. Do not close or modify them.
     */
    public Map<String, NDArray> stateArrays(String parameterId) {
        MomentState s = states.get(parameterId);
        return s == null ? new LinkedHashMap<>() : s.arrays();
    }

    /**
     * Restores the state of a parameter: the arrays are copied into new arrays of this optimizer's manager on the
     * weight's device, so the caller may close them (arrays loaded from files are never aliased).
     *
     * @param name the parameter's name, for messages
     * @param arrays by name as {@link #stateArrays} gives them; may be empty when {@code step} is 0
     * @throws IllegalArgumentException naming the parameter and the missing, mistyped or misshaped array
     */
    public void restore(String parameterId, String name, long step, Map<String, NDArray> arrays, NDArray weight) {
        Preconditions.checkArgument(step >= 0, "optimizer state of %s: negative step %s", name, step);
        MomentState s = null;
        if (step > 0) {
            s = MomentState.restored(name, arrays, weight, quantizes(weight.size()), blockSize, manager,
                    codes(weight.getDevice()));
            s.step = step;
        }
        MomentState old = s == null ? states.remove(parameterId) : states.put(parameterId, s);
        if (old != null) {
            old.close();
        }
    }

    /**
     * A copy of a parameter's state as a list of named arrays in {@code into}: those of {@link #stateArrays} and
     * {@value #STEP}, an INT64 array of one element holding the step count.
     */
    public NDList saveState(String parameterId, NDManager into) {
        NDList out = new NDList();
        for (Map.Entry<String, NDArray> e : stateArrays(parameterId).entrySet()) {
            NDArray copy = e.getValue().duplicate();
            copy.attach(into);
            copy.setName(e.getKey());
            out.add(copy);
        }
        NDArray step = into.create(new long[] {stepCount(parameterId)});
        step.setName(STEP);
        out.add(step);
        return out;
    }

    /** Restores what {@link #saveState} wrote (copying it, as {@link #restore} does). */
    public void restoreState(String parameterId, String name, NDList saved, NDArray weight) {
        Map<String, NDArray> arrays = new LinkedHashMap<>();
        NDArray step = null;
        for (NDArray a : saved) {
            Preconditions.checkArgument(a.getName() != null, "optimizer state of %s holds an array without a name",
                    name);
            if (STEP.equals(a.getName())) {
                step = a;
            } else {
                arrays.put(a.getName(), a);
            }
        }
        Preconditions.checkArgument(step != null && step.size() == 1 && step.getDataType() == DataType.INT64,
                "optimizer state of %s needs an INT64 array '%s' of one element, got %s", name, STEP,
                step == null ? "none" : step.getDataType() + " " + step.getShape());
        restore(parameterId, name, step.toLongArray()[0], arrays, weight);
    }

    /**
     * Bytes held by the parameters' state arrays: {@code 2 (n + 4 ceil(n / B))} per quantized parameter,
     * {@code 8 n} per FP32 one. The code tables (4 KiB per device) are not counted.
     */
    public long stateBytes() {
        long total = 0;
        for (MomentState s : states.values()) {
            total += s.bytes();
        }
        return total;
    }

    /** Frees the state arrays and code tables. */
    @Override
    public void close() {
        buckets.close();
        for (MomentState s : states.values()) {
            s.close();
        }
        states.clear();
        for (NDList c : constants.values()) {
            c.close();
        }
        constants.clear();
        for (BlockwiseCode.OnDevice[] c : codes.values()) {
            c[0].close();
            c[1].close();
        }
        codes.clear();
    }

    /**
     * Builder: {@code setManager} required; defaults lr 1e-3, betas (0.9, 0.999), eps 1e-8, no decay, blocks of 256,
     * 8-bit moments from 4096 elements, chunks of 2^20 elements on the CPU and 2^23 on a GPU.
     */
    public static final class Builder {
        /** The default chunk on the CPU: about 35 MB of temporaries. */
        static final long CPU_CHUNK_ELEMENTS = 1L << 20;
        /** The default chunk on a GPU: about 280 MB of temporaries, 34 chunks for 284M parameters. */
        static final long GPU_CHUNK_ELEMENTS = 1L << 23;

        private NDManager manager;
        private float learningRate = 1e-3f;
        private float beta1 = 0.9f;
        private float beta2 = 0.999f;
        private float epsilon = 1e-8f;
        private float weightDecay;
        private int blockSize = 256;
        private long minQuantizedSize = 4096;
        private Long chunkElements; // null: by device
        private boolean searchEncode;

        private Builder() {}

        /** Where the state arrays are allocated (each lives on its weight's device). */
        public Builder setManager(NDManager manager) {
            this.manager = manager;
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

        /** Decoupled weight decay ({@code w *= 1 - lr wd} before the Adam step). */
        public Builder optWeightDecay(float weightDecay) {
            this.weightDecay = weightDecay;
            return this;
        }

        /** Elements per quantization block, each with its own FP32 scale (default 256, as bitsandbytes; the paper used 2048). */
        public Builder optBlockSize(int blockSize) {
            this.blockSize = blockSize;
            return this;
        }

        /** Parameters with fewer elements keep FP32 moments (default 4096, bitsandbytes' {@code min_8bit_size}). */
        public Builder optMinQuantizedSize(long elements) {
            this.minQuantizedSize = elements;
            return this;
        }

        /**
         * The most elements updated at once, rounded down to whole blocks (at least one): bounds the dequantized
         * moments and temporaries of a step, about 33 bytes per element (default 2^20 on the CPU, 2^23 on a GPU),
         * and the buckets of {@link EightBitAdamW#stepAll}.
         */
        public Builder optChunkElements(long elements) {
            this.chunkElements = elements;
            return this;
        }

        /**
         * Requantizes by the reference binary search ({@link BlockwiseCode.OnDevice#encodeBySearch}) instead of the key
         * tables: the same bits, four times the operations; for tests and benchmarks.
         */
        Builder optSearchEncode(boolean search) {
            this.searchEncode = search;
            return this;
        }

        public EightBitAdamW build() {
            Preconditions.checkArgument(manager != null, "EightBitAdamW needs a manager: call setManager");
            Preconditions.checkArgument(learningRate >= 0 && Float.isFinite(learningRate),
                    "learning rate must be finite and >= 0, got %s", learningRate);
            Preconditions.checkArgument(beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got %s", beta1);
            Preconditions.checkArgument(beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got %s", beta2);
            Preconditions.checkArgument(epsilon > 0 && Float.isFinite(epsilon),
                    "epsilon must be finite and > 0, got %s", epsilon);
            Preconditions.checkArgument(weightDecay >= 0 && Float.isFinite(weightDecay),
                    "weight decay must be finite and >= 0, got %s", weightDecay);
            Preconditions.checkArgument(blockSize >= 1, "block size must be >= 1, got %s", blockSize);
            Preconditions.checkArgument(minQuantizedSize >= 0, "minimum quantized size must be >= 0, got %s",
                    minQuantizedSize);
            Preconditions.checkArgument(chunkElements == null || chunkElements >= 1,
                    "chunk elements must be >= 1, got %s", chunkElements);
            return new EightBitAdamW(this);
        }
    }
}
