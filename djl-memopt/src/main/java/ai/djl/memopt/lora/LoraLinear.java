package ai.djl.memopt.lora;

import ai.djl.Device;
import ai.djl.memopt.nn.BlockAdapter;
import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.memopt.nn.Scalars;
import ai.djl.memopt.nn.StackableProjection;
import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.nn.norm.Dropout;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;
import java.util.ArrayList;
import java.util.List;

/**
 * A LoRA adapter around a projection: {@code y = base(x) + scale * (x A^T) B^T} with {@code scale = alpha / r}
 * (or {@code alpha / sqrt(r)} with rsLoRA). The base is a plain DJL {@link Linear} or any {@link LinearWeightSource}
 * (a quantized projection, for QLoRA); its parameters are left as they are (frozen by {@link Lora#apply}).
 *
 * <p>Named as in Hugging Face PEFT, so that {@code BlockTrees.parameters} gives PEFT's names: the child
 * {@code base_layer} (the wrapped block) and the parameters {@code lora_A.weight} {@code (r, in)}, kaiming-uniform with
 * a = sqrt(5) like PEFT, i.e. uniform in {@code [-1/sqrt(in), 1/sqrt(in)]}, and {@code lora_B.weight}
 * {@code (out, r)}, zero, so a fresh adapter leaves the model's outputs unchanged. The adapter matrices are plain
 * parameters, not child {@code Linear} blocks, so passes that look for Linear layers (quantization, FP16 wrappers)
 * reach the base and leave the adapters alone.
 *
 * <p>Shapes: input {@code (..., in)} -> output {@code (..., out)}. The adapter computes in the input's type: adapter
 * weights (FLOAT32 by default) are cast to FLOAT16 in the forward when the input is FLOAT16, since DJL has no mixed
 * FP32 x FP16 matmul; gradients flow back to the FLOAT32 weights through the cast.
 *
 * <pre>{@code
 * Block wrapped = LoraLinear.builder().setBase(qProj).setRank(8).optAlpha(16).build();
 * NDArray w = ((LoraLinear) wrapped).weight(manager); // W + scale * B A, (out, in)
 * }</pre>
 */
public final class LoraLinear extends AbstractBlock implements BlockAdapter, LinearWeightSource, StackableProjection {

    private static final byte VERSION = 1;

    /** Held as {@code Block} and always called through this field, so the base itself can be decorated later. */
    private Block base;
    private final Parameter loraA;
    private final Parameter loraB;
    /** Rank, alpha, dropout, rsLoRA and adapter type; its targets mean nothing here. */
    private final LoraConfig settings;
    private final float scale;
    private final long inFeatures;
    private final long outFeatures;

    private LoraLinear(Builder b, LoraConfig settings, long inFeatures, long outFeatures, Device device) {
        super(VERSION);
        this.settings = settings;
        this.scale = settings.scale();
        this.inFeatures = inFeatures;
        this.outFeatures = outFeatures;
        base = addChildBlock("base_layer", b.base);
        // parameters named "lora_A.weight" rather than child Linear blocks: tools that walk the tree for Linear layers
        // (quantization, FP16 autocast wrappers) must find the base projection, never the adapter matrices
        loraA = addParameter(Parameter.builder().setName("lora_A.weight").setType(Parameter.Type.WEIGHT).build());
        loraB = addParameter(Parameter.builder().setName("lora_B.weight").setType(Parameter.Type.WEIGHT).build());

        NDManager manager = b.manager;
        float bound = (float) (1.0 / Math.sqrt(inFeatures));
        // kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
        int rank = settings.rank();
        DataType type = settings.dataType();
        NDArray a = manager.randomUniform(-bound, bound, new Shape(rank, inFeatures), type, device); // (r, in)
        NDArray z = manager.zeros(new Shape(outFeatures, rank), type, device); // (out, r)
        loraA.setArray(a);
        loraB.setArray(z);
        // with the arrays set, initialize only marks them as requiring gradients
        loraA.initialize(manager, type);
        loraB.initialize(manager, type);
        beforeInitialize(new Shape(inFeatures));
    }

    /** A new builder. */
    public static Builder builder() {
        return new Builder();
    }

    /** The wrapped block. */
    @Override
    public Block base() {
        return base;
    }

    /** The rank r. */
    public int rank() {
        return settings.rank();
    }

    /** {@code lora_alpha}. */
    public float alpha() {
        return settings.alpha();
    }

    /** Whether the scale is {@code alpha / sqrt(r)}. */
    public boolean useRslora() {
        return settings.useRslora();
    }

    /** Dropout on the adapter input while training. */
    public float dropout() {
        return settings.dropout();
    }

    /** The multiplier of the adapter output. */
    public float scale() {
        return scale;
    }

    /** Input features. */
    public long inFeatures() {
        return inFeatures;
    }

    /** Output features. */
    public long outFeatures() {
        return outFeatures;
    }

    /** The {@code lora_A} parameter, {@code (r, in)}. */
    public Parameter loraA() {
        return loraA;
    }

    /** The {@code lora_B} parameter, {@code (out, r)}. */
    public Parameter loraB() {
        return loraB;
    }

    /**
     * Replaces the adapter weights by copies of {@code a} {@code (r, in)} and {@code b} {@code (out, r)}, converted to
     * the adapter's type and device. The parameter arrays keep their identity (an optimizer holding them still works).
     *
     * @throws IllegalArgumentException if a shape differs
     */
    public void setAdapterWeights(NDArray a, NDArray b) {
        int rank = rank();
        Preconditions.checkArgument(a.getShape().equals(new Shape(rank, inFeatures)),
                "lora_A must have shape (%s, %s), got %s", rank, inFeatures, a.getShape());
        Preconditions.checkArgument(b.getShape().equals(new Shape(outFeatures, rank)),
                "lora_B must have shape (%s, %s), got %s", outFeatures, rank, b.getShape());
        replaceValue(loraA(), a);
        replaceValue(loraB(), b);
    }

    private static void replaceValue(Parameter p, NDArray value) {
        NDArray target = p.getArray();
        NDArray moved = value.toDevice(target.getDevice(), false);
        NDArray copy = moved.toType(target.getDataType(), false);
        if (moved != value && moved != copy) {
            moved.close();
        }
        if (copy == value) {
            copy = value.duplicate();
        }
        // a leaf again, whatever graph the value came from
        NDArray leaf = copy.stopGradient();
        copy.close();
        copy = leaf;
        // intern swaps the native tensor under the same Java array, which the parameter (and a trainer's store) hold
        target.intern(copy);
        target.setRequiresGradient(p.requiresGradient());
    }

    @Override
    protected NDList forwardInternal(ParameterStore parameterStore, NDList inputs, boolean training,
            PairList<String, Object> params) {
        NDArray x = inputs.singletonOrThrow(); // (..., in)
        Shape xs = x.getShape();
        Preconditions.checkArgument(xs.dimension() >= 1 && xs.get(xs.dimension() - 1) == inFeatures,
                "LoRA projection expects input (..., %s), got %s", inFeatures, xs);
        DataType type = x.getDataType();
        Preconditions.checkArgument(type == DataType.FLOAT32 || type == DataType.FLOAT16 || type == DataType.FLOAT64,
                "LoRA projection needs a floating-point input, got %s", type);
        NDArray y = base.forward(parameterStore, inputs, training, params).singletonOrThrow(); // (..., out)

        Device device = x.getDevice();
        NDArray a = parameterStore.getValue(loraA(), device, training); // (r, in)
        NDArray b = parameterStore.getValue(loraB(), device, training); // (out, r)
        NDArray aCast = cast(a, type);
        NDArray bCast = cast(b, type);
        float dropout = dropout();
        NDArray xd = training && dropout > 0 ? Dropout.dropout(x, dropout, true).singletonOrThrow() : x;
        NDArray down = Linear.linear(xd, aCast).singletonOrThrow(); // (..., r)
        NDArray up = Linear.linear(down, bCast).singletonOrThrow(); // (..., out)
        NDArray delta; // (..., out)
        delta = Scalars.mul(up, scale);
        if (delta.getDataType() != y.getDataType()) {
            NDArray cast = cast(delta, y.getDataType());
            delta.close();
            delta = cast;
        }
        NDArray out = y.add(delta); // (..., out)
        // autograd keeps its own references to what backward needs, so the Java handles can go now
        delta.close();
        up.close();
        down.close();
        if (xd != x) {
            xd.close();
        }
        if (aCast != a) {
            aCast.close();
        }
        if (bCast != b) {
            bCast.close();
        }
        return new NDList(out);
    }

    /**
     * Casts keeping the autograd graph ({@link TypeCasts#cast}): DJL's {@code toType} runs under a no-grad guard in the
     * PyTorch JNI, so a weight cast with it would get no gradient.
     */
    static NDArray cast(NDArray array, DataType type) {
        return TypeCasts.cast(array, type);
    }

    /** The base's stackable arrays, then {@code A (r, in)} and {@code B (out, r)}. */
    @Override
    public List<NDArray> weightArrays() {
        List<NDArray> arrays = new ArrayList<>(StackableProjection.of(base).weightArrays());
        arrays.add(loraA.getArray());
        arrays.add(loraB.getArray());
        return arrays;
    }

    @Override
    public String stackMismatch(StackableProjection other) {
        LoraLinear l = (LoraLinear) other;
        NDArray a = l.loraA().getArray();
        NDArray a0 = loraA().getArray();
        if (l.rank() != rank() || l.scale() != scale() || a.getDataType() != a0.getDataType()
                || l.loraB().getArray().getDataType() != loraB().getArray().getDataType()
                || !a.getDevice().equals(a0.getDevice())) {
            return "LoRA rank " + l.rank() + ", scale " + l.scale() + ", " + a.getDataType() + " differ from expert 0's";
        }
        String why = StackableProjection.mismatch(base, l.base());
        return why == null ? null : "LoRA base: " + why;
    }

    /**
     * The base's output plus {@code scale (x A^T) B^T}, computed as {@link #forward} does at inference (adapters cast to
     * the input's type, the delta cast to the base output's).
     */
    @Override
    public NDArray project(List<NDArray> rows, NDArray x, DataType type) {
        int n = rows.size();
        NDArray y = StackableProjection.of(base).project(rows.subList(0, n - 2), x, type); // (c, 1, out)
        NDArray down = StackableProjection.times(rows.get(n - 2).toType(type, false), x); // (c, 1, r)
        NDArray up = StackableProjection.times(rows.get(n - 1).toType(type, false), down); // (c, 1, out)
        NDArray delta = Scalars.mul(up, scale);
        return y.add(delta.toType(y.getDataType(), false));
    }

    /**
     * The merged weight {@code W + scale * B A}, {@code (out, in)}, in the base weight's type (summed in FLOAT32),
     * attached to {@code manager} and detached from autograd.
     */
    @Override
    public NDArray weight(NDManager manager) {
        try (NDManager scope = manager.newSubManager()) {
            NDArray w = baseWeight(base, scope); // (out, in)
            DataType type = w.getDataType();
            NDArray merged = merged(w, scope).toType(type, false); // (out, in)
            NDArray result = merged.stopGradient();
            result.attach(manager);
            return result;
        }
    }

    /**
     * {@code W + scale * B A} in FLOAT32; temporaries and the result are attached to {@code scope}.
     */
    NDArray merged(NDArray w, NDManager scope) {
        NDArray a = loraA().getArray().toType(DataType.FLOAT32, true); // (r, in)
        NDArray b = loraB().getArray().toType(DataType.FLOAT32, true); // (out, r)
        NDArray w32 = w.toType(DataType.FLOAT32, true); // (out, in)
        a.attach(scope);
        b.attach(scope);
        w32.attach(scope);
        NDArray ba = b.matMul(a); // (out, in)
        ba.attach(scope);
        NDArray scaled = ba.mul(scale);
        scaled.attach(scope);
        NDArray sum = w32.add(scaled);
        sum.attach(scope);
        return sum;
    }

    /**
     * The base's weight (out, in). For a plain Linear this is its parameter array, which must not be closed, so it is
     * never attached to {@code scope}; a decorator's fresh array is.
     */
    static NDArray baseWeight(Block base, NDManager scope) {
        if (base instanceof Linear) {
            return weightOfChild(base).getArray();
        }
        return LinearWeightSource.weightOf(base, scope);
    }

    private static Parameter weightOfChild(Block linear) {
        return linear.getParameters().get("weight");
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return base.getOutputShapes(inputShapes);
    }

    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        if (!base.isInitialized()) {
            base.initialize(manager, dataType, inputShapes);
        }
    }

    @Override
    public String toString() {
        return "LoraLinear(" + inFeatures + " -> " + outFeatures + ", r=" + rank() + ", alpha=" + alpha()
                + (useRslora() ? ", rslora" : "") + (dropout() > 0 ? ", dropout=" + dropout() : "") + ", base="
                + base.getClass().getSimpleName() + ")";
    }

    /**
     * Builds a {@link LoraLinear}: {@code setBase} and {@code setRank} are required; rank, alpha, dropout and type can
     * also come from a {@link LoraConfig} ({@link #optConfig}). The settings are a {@link LoraConfig}'s, with its
     * defaults and checks.
     */
    public static final class Builder {
        private Block base;
        private LoraConfig.Builder settings = LoraConfig.builder();
        private NDManager manager;

        private Builder() {}

        /** The block to wrap: a {@link Linear} or a {@link LinearWeightSource} (required). */
        public Builder setBase(Block base) {
            this.base = base;
            return this;
        }

        /** The rank r (required). */
        public Builder setRank(int rank) {
            settings.setRank(rank);
            return this;
        }

        /** {@code lora_alpha} (default 8). */
        public Builder optAlpha(float alpha) {
            settings.optAlpha(alpha);
            return this;
        }

        /** Dropout on the adapter input while training (default 0). */
        public Builder optDropout(float dropout) {
            settings.optDropout(dropout);
            return this;
        }

        /** rsLoRA scaling {@code alpha / sqrt(r)}. */
        public Builder optUseRslora(boolean useRslora) {
            settings.optUseRslora(useRslora);
            return this;
        }

        /** Adapter weight type, FLOAT32 (default) or FLOAT16. */
        public Builder optDataType(DataType dataType) {
            settings.optDataType(dataType);
            return this;
        }

        /** Rank, alpha, dropout, rsLoRA and type from a config (its targets are not used). */
        public Builder optConfig(LoraConfig config) {
            this.settings = config.toBuilder();
            return this;
        }

        /**
         * The manager that owns the adapter weights (default: the manager of the base's weight array, so adapters live
         * as long as the model).
         */
        public Builder optManager(NDManager manager) {
            this.manager = manager;
            return this;
        }

        /**
         * Validates and builds, creating the adapter weights on the base weight's device.
         *
         * @throws IllegalArgumentException naming the bad value
         */
        public LoraLinear build() {
            Preconditions.checkArgument(base != null, "setBase(...) is required");
            Preconditions.checkArgument(!(base instanceof LoraLinear), "the block already has a LoRA adapter: %s",
                    base);
            Preconditions.checkArgument(base instanceof Linear || base instanceof LinearWeightSource,
                    "LoRA wraps a Linear or a LinearWeightSource, got %s", base.getClass().getName());
            LoraConfig adapter = settings.buildAdapterSettings();
            long in;
            long out;
            Device device;
            if (base instanceof Linear) {
                Parameter w = weightOfChild(base);
                Preconditions.checkArgument(w.isInitialized(),
                        "the Linear to wrap has no weight yet: initialize or load the model first");
                Shape s = w.getArray().getShape();
                out = s.get(0);
                in = s.get(1);
                device = w.getArray().getDevice();
                if (manager == null) {
                    manager = w.getArray().getManager();
                }
            } else {
                NDManager probeParent = manager != null ? manager : anyParameterManager(base);
                Preconditions.checkArgument(probeParent != null,
                        "cannot tell where %s keeps its weights: pass optManager(...)", base.getClass().getName());
                try (NDManager probe = probeParent.newSubManager()) {
                    NDArray w = LinearWeightSource.weightOf(base, probe); // (out, in)
                    Preconditions.checkArgument(w.getShape().dimension() == 2,
                            "%s.weight() must be (out, in), got %s", base.getClass().getSimpleName(), w.getShape());
                    out = w.getShape().get(0);
                    in = w.getShape().get(1);
                    device = w.getDevice();
                }
                if (manager == null) {
                    manager = probeParent;
                }
            }
            return new LoraLinear(this, adapter, in, out, device);
        }

        private static NDManager anyParameterManager(Block block) {
            for (Parameter p : block.getParameters().values()) {
                if (p.isInitialized()) {
                    return p.getArray().getManager();
                }
            }
            return null;
        }
    }
}
