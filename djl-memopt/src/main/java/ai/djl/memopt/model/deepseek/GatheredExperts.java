package ai.djl.memopt.model.deepseek;

import ai.djl.Device;
import ai.djl.memopt.lora.LoraLinear;
import ai.djl.memopt.nn.Scalars;
import ai.djl.memopt.precision.Precisions;
import ai.djl.memopt.quantize.Int4Packing;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.ndarray.types.SparseFormat;
import ai.djl.nn.Activation;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Embedding;
import ai.djl.nn.core.Linear;
import ai.djl.util.NativeResource;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.function.Function;

/**
 * The routed experts of one {@link DeepSeekMoE} stacked per projection, so that the experts chosen by the router can
 * be gathered on the device with the {@code (N*k)} expert-id tensor itself as the index: no host read of the ids.
 *
 * <p><b>Storage.</b> Building the stacks does not double the experts' memory: each projection's arrays are stacked
 * into one {@code (E, out, in)} array (int8: data {@code (E, out, in)} and scales {@code (E, out, 1)}; int4: packed
 * data {@code (E, out, in/2)}, scales and zero points {@code (E, out, in/g)}; AWQ input scales {@code (E, in)}; LoRA:
 * the base as above and the adapters {@code A (E, r, in)}, {@code B (E, out, r)}) and
 * every per-expert array is then turned, in place, into a view of its slice, its own storage released. The Java
 * objects stay the same ({@code NDArray.intern}): a {@link Linear}'s parameter, a parameter store or predictor that
 * cached it, an optimizer, a {@link QuantizedTensor} all keep working and now read and write the stack, so in-place
 * updates (an optimizer step) are seen by the gathered path. Replacing an expert's projection block or interning a
 * new array into it afterwards is detected by {@link #isCurrent} (block identity and native handle), and the owner
 * rebuilds.
 *
 * <p><b>Forward</b> (inference only: gradients do not reach the stacks). Per chunk of {@code c} assignments (token,
 * choice) in token-major order: {@code W = stack[ids]} {@code (c, out, in)} (an {@code index_select} through the
 * embedding op; quantized: only the gathered rows are dequantized, with the same ops as
 * {@link QuantizedTensor#dequantize}), {@code W x^T (c, out, 1) -> (c, 1, out)},
 * SwiGLU, then the outputs weighted by the FP32 router weights and summed over the {@code k} choices, as the sorted
 * dispatch does. Each gathered weight is closed right after its matmul, so the temporaries are one projection of
 * {@code c} experts ({@code c} chosen so that its FP32 size stays under the chunk budget).
 */
final class GatheredExperts {

    private static final List<String> NAMES = List.of("gate_proj", "up_proj", "down_proj");
    private static final List<Function<DeepSeekMlp, Block>> GETTERS =
            List.of(DeepSeekMlp::gateProj, DeepSeekMlp::upProj, DeepSeekMlp::downProj);

    private final DeepSeekMlp[] mlps;
    private final Stack[] stacks; // gate, up, down

    private GatheredExperts(DeepSeekMlp[] mlps, Stack[] stacks) {
        this.mlps = mlps;
        this.stacks = stacks;
    }

    /** Why the experts cannot be stacked, or null if they can. Reads only block types, shapes and types. */
    static String unsupportedReason(ModuleList experts) {
        int e = experts.size();
        if (e == 0) {
            return "no routed experts";
        }
        for (int i = 0; i < e; i++) {
            if (!(experts.get(i) instanceof DeepSeekMlp)) {
                return "expert " + i + " is a " + experts.get(i).getClass().getName() + ", not a DeepSeekMlp";
            }
        }
        for (int p = 0; p < 3; p++) {
            Block first = GETTERS.get(p).apply((DeepSeekMlp) experts.get(0));
            for (int i = 0; i < e; i++) {
                Block b = GETTERS.get(p).apply((DeepSeekMlp) experts.get(i));
                String why = kindMismatch(first, b);
                if (why != null) {
                    return "experts." + i + "." + NAMES.get(p) + ": " + why;
                }
            }
        }
        return null;
    }

    /** Null if {@code b} can share a stack with {@code first}, else why not. */
    private static String kindMismatch(Block first, Block b) {
        if (b.getClass() == Linear.class) {
            if (first.getClass() != Linear.class) {
                return "a Linear among " + first.getClass().getSimpleName() + " experts";
            }
            if (b.getParameters().size() != 1 || b.getParameters().get("weight") == null) {
                return "a Linear with a bias";
            }
            NDArray w = b.getParameters().get("weight").getArray();
            NDArray w0 = first.getParameters().get("weight").getArray();
            if (!w.getShape().equals(w0.getShape()) || w.getDataType() != w0.getDataType()
                    || !w.getDevice().equals(w0.getDevice())) {
                return "weight " + w.getShape() + " " + w.getDataType() + " differs from expert 0's";
            }
            return null;
        }
        if (b instanceof QuantizedLinear) {
            if (!(first instanceof QuantizedLinear)) {
                return "a QuantizedLinear among " + first.getClass().getSimpleName() + " experts";
            }
            QuantizedLinear q = (QuantizedLinear) b;
            QuantizedTensor t = q.quantizedWeight();
            QuantizedTensor t0 = ((QuantizedLinear) first).quantizedWeight();
            if (q.bias().isPresent()) {
                return "a quantized projection with a bias";
            }
            if (t.scheme() != t0.scheme() || t.groupSize() != t0.groupSize() || !t.shape().equals(t0.shape())
                    || t.inputScales().isPresent() != t0.inputScales().isPresent()
                    || !t.data().getDevice().equals(t0.data().getDevice())) {
                return t + " differs from expert 0's " + t0;
            }
            if (t.scheme() != QuantScheme.INT8_WEIGHT_ONLY && t.scheme() != QuantScheme.INT4_WEIGHT_ONLY) {
                return "scheme " + t.scheme() + " is not supported";
            }
            return null;
        }
        if (b instanceof LoraLinear) {
            if (!(first instanceof LoraLinear)) {
                return "a LoraLinear among " + first.getClass().getSimpleName() + " experts";
            }
            LoraLinear l = (LoraLinear) b;
            LoraLinear l0 = (LoraLinear) first;
            NDArray a = l.loraA().getArray();
            NDArray a0 = l0.loraA().getArray();
            if (l.rank() != l0.rank() || l.scale() != l0.scale() || a.getDataType() != a0.getDataType()
                    || l.loraB().getArray().getDataType() != l0.loraB().getArray().getDataType()
                    || !a.getDevice().equals(a0.getDevice())) {
                return "LoRA rank " + l.rank() + ", scale " + l.scale() + ", " + a.getDataType() + " differ from expert 0's";
            }
            String base = kindMismatch(l0.base(), l.base());
            return base == null ? null : "LoRA base: " + base;
        }
        return "a " + b.getClass().getName()
                + " (only plain Linear, int8/int4 QuantizedLinear and LoRA over those are gathered)";
    }

    /**
     * Stacks the experts (see the class documentation: the per-expert arrays become views and are freed).
     *
     * @throws IllegalArgumentException if {@link #unsupportedReason} is not null
     */
    static GatheredExperts build(ModuleList experts) {
        String why = unsupportedReason(experts);
        if (why != null) {
            throw new IllegalArgumentException(why);
        }
        int e = experts.size();
        DeepSeekMlp[] mlps = new DeepSeekMlp[e];
        for (int i = 0; i < e; i++) {
            mlps[i] = (DeepSeekMlp) experts.get(i);
        }
        Stack[] stacks = new Stack[3];
        for (int p = 0; p < 3; p++) {
            Block[] blocks = new Block[e];
            for (int i = 0; i < e; i++) {
                blocks[i] = GETTERS.get(p).apply(mlps[i]);
            }
            stacks[p] = stackOf(blocks);
        }
        return new GatheredExperts(mlps, stacks);
    }

    /** The stack for one projection of every expert (same kind, checked by {@link #kindMismatch}). */
    private static Stack stackOf(Block[] blocks) {
        if (blocks[0] instanceof LoraLinear) {
            return LoraStack.build(blocks);
        }
        return blocks[0] instanceof QuantizedLinear ? QuantizedStack.build(blocks) : FloatStack.build(blocks);
    }

    /** Whether every expert still runs on the arrays this object stacked. */
    boolean isCurrent(ModuleList experts) {
        if (experts.size() != mlps.length) {
            return false;
        }
        for (int i = 0; i < mlps.length; i++) {
            if (experts.get(i) != mlps[i]) {
                return false;
            }
            for (int p = 0; p < 3; p++) {
                if (!stacks[p].isCurrent(GETTERS.get(p).apply(mlps[i]), i)) {
                    return false;
                }
            }
        }
        return true;
    }

    /** The device of the stacks (inputs elsewhere take the sorted path, which lets the parameter store copy). */
    Device device() {
        return stacks[0].device();
    }

    /** Elements of the largest expert matrix. */
    private long largestMatrix() {
        long max = 0;
        for (Stack s : stacks) {
            max = Math.max(max, s.out * s.in);
        }
        return max;
    }

    /** Assignments per chunk so that one gathered projection, in FP32, stays within {@code chunkBytes}. */
    int chunkSize(long chunkBytes) {
        return (int) Math.max(1, Math.min(Integer.MAX_VALUE, chunkBytes / (largestMatrix() * 4)));
    }

    /**
     * Runs the chosen experts and combines their outputs, with no device-to-host copy.
     *
     * @param x {@code (N, H)} token rows
     * @param topkIdx {@code (N, k)} chosen expert ids
     * @param topkWeight {@code (N, k)} FP32 routing weights
     * @param chunkBytes budget for one gathered projection in FP32 (see {@link #chunkSize})
     * @return {@code (N, H)} in {@code x}'s type
     */
    NDArray forward(NDArray x, NDArray topkIdx, NDArray topkWeight, long chunkBytes) {
        return Scoped.run(() -> {
            long n = topkIdx.getShape().get(0);
            int k = (int) topkIdx.getShape().get(1);
            long h = x.getShape().get(1);
            long total = n * k;
            DataType type = x.getDataType();
            NDArray ids = topkIdx.toType(DataType.INT64, false).reshape(total); // (N*k) token-major, on the device
            NDArray tokens = x.expandDims(1).broadcast(n, k, h).reshape(total, 1, h); // (N*k, 1, H): row a is token a / k
            int chunk = chunkSize(chunkBytes);
            List<NDArray> outs = new ArrayList<>();
            for (long a = 0; a < total; a += chunk) {
                long end = Math.min(total, a + chunk);
                NDArray id = end - a == total ? ids : ids.get(new NDIndex("{}:{}", a, end)); // (c)
                NDArray xc = end - a == total ? tokens : tokens.get(new NDIndex("{}:{}", a, end)); // (c, 1, H)
                NDArray g = project(stacks[0], id, xc, type); // (c, 1, I)
                NDArray u = project(stacks[1], id, xc, type); // (c, 1, I)
                NDArray act = g.mul(Activation.sigmoid(g)).mul(u); // silu(g) * u, as DeepSeekMlp
                outs.add(project(stacks[2], id, act, type)); // (c, 1, H)
            }
            NDArray out = (outs.size() == 1 ? outs.get(0) : NDArrays.concat(new NDList(outs), 0)).reshape(total, h);
            return new NDList(DeepSeekMoE.combine(out, topkWeight)); // (N, H)
        }).head();
    }

    /** {@code x (c, 1, in) -> (c, 1, out)} through the chosen experts; temporaries are freed before returning. */
    private static NDArray project(Stack stack, NDArray ids, NDArray x, DataType type) {
        return Scoped.run(() -> new NDList(stack.project(ids, x, type))).head();
    }

    /** {@code x (c, 1, in) x w^T} for gathered weights {@code w (c, out, in)}: {@code (c, 1, out)}. */
    private static NDArray times(NDArray w, NDArray x) {
        Shape s = w.getShape();
        // W x^T rather than x W^T: the gathered weight is used as laid out, only the small x is transposed
        return w.matMul(x.transpose(0, 2, 1)).reshape(s.get(0), 1, s.get(1)); // (c, out, 1) -> (c, 1, out)
    }

    /**
     * Rows {@code ids} of {@code stack (E, ...)}: {@code (c, ...)}. Through the embedding op, i.e. {@code index_select}
     * (whole contiguous rows copied at once), rather than advanced indexing, which copies element by element on CPU.
     */
    private static NDArray rows(NDArray stack, NDArray ids) {
        Shape shape = stack.getShape();
        NDArray flat = stack.reshape(shape.get(0), -1); // (E, rest), a view
        NDArray picked = Embedding.embedding(ids, flat, SparseFormat.DENSE).head(); // (c, rest)
        return picked.reshape(new Shape(ids.getShape().get(0)).addAll(shape.slice(1)));
    }

    /** One projection of all experts. */
    private abstract static class Stack {
        final long out;
        final long in;

        Stack(long out, long in) {
            this.out = out;
            this.in = in;
        }

        /** The chosen experts' effective weights {@code (c, out, in)} in {@code type}. */
        abstract NDArray gather(NDArray ids, DataType type);

        /** {@code x (c, 1, in)} through the chosen experts' projections: {@code (c, 1, out)}. */
        NDArray project(NDArray ids, NDArray x, DataType type) {
            return times(gather(ids, type), x);
        }

        /** Whether {@code projection}, expert {@code e}'s block now, still runs on this stack. */
        abstract boolean isCurrent(Block projection, int e);

        abstract Device device();
    }

    /** Plain {@link Linear} experts: the stack is the storage of their weight parameters. */
    private static final class FloatStack extends Stack {
        private final NDArray stack; // (E, out, in)
        private final Block[] blocks;
        private final Parameter[] params;
        private final NDArray[] views;
        private final Object[] handles;

        private FloatStack(NDArray stack, Block[] blocks, Parameter[] params, NDArray[] views, Object[] handles) {
            super(stack.getShape().get(1), stack.getShape().get(2));
            this.stack = stack;
            this.blocks = blocks;
            this.params = params;
            this.views = views;
            this.handles = handles;
        }

        static FloatStack build(Block[] blocks) {
            int e = blocks.length;
            Parameter[] params = new Parameter[e];
            NDList arrays = new NDList(e);
            for (int i = 0; i < e; i++) {
                params[i] = blocks[i].getParameters().get("weight");
                arrays.add(params[i].getArray());
            }
            NDArray stack = stackArrays(arrays); // (E, out, in)
            NDArray[] views = new NDArray[e];
            Object[] handles = new Object[e];
            for (int i = 0; i < e; i++) {
                views[i] = arrays.get(i);
                handles[i] = adopt(views[i], stack, i);
            }
            return new FloatStack(stack, blocks, params, views, handles);
        }

        @Override
        Device device() {
            return stack.getDevice();
        }

        @Override
        NDArray gather(NDArray ids, DataType type) {
            return rows(stack, ids); // (c, out, in); a Linear runs in its weight's type
        }

        @Override
        boolean isCurrent(Block projection, int e) {
            // a Linear's weight Parameter is fixed, but its array can be swapped (precision) or interned
            return projection == blocks[e]
                    && params[e].getArray() == views[e]
                    && Objects.equals(handle(views[e]), handles[e]);
        }
    }

    /** int8 / int4 {@link QuantizedLinear} experts: their quantized arrays become views of the stacks. */
    private static final class QuantizedStack extends Stack {
        private final QuantScheme scheme;
        private final int groupSize;
        private final NDArray data; // int8 (E, out, in) INT8; int4 (E, out, in/2) UINT8
        private final NDArray scales; // (E, out, 1) or (E, out, in/g) FP32
        private final NDArray zeros; // int4: (E, out, in/g) UINT8
        private final NDArray inputScales; // AWQ: (E, in) FP32, else null
        private final QuantizedLinear[] blocks;
        private final Object[] handles;

        private QuantizedStack(QuantizedTensor first, NDArray data, NDArray scales, NDArray zeros, NDArray inputScales,
                QuantizedLinear[] blocks, Object[] handles) {
            super(first.shape().get(0), first.shape().get(1));
            this.scheme = first.scheme();
            this.groupSize = first.groupSize();
            this.data = data;
            this.scales = scales;
            this.zeros = zeros;
            this.inputScales = inputScales;
            this.blocks = blocks;
            this.handles = handles;
        }

        static QuantizedStack build(Block[] projections) {
            int e = projections.length;
            QuantizedLinear[] blocks = new QuantizedLinear[e];
            for (int i = 0; i < e; i++) {
                blocks[i] = (QuantizedLinear) projections[i];
            }
            QuantizedTensor first = blocks[0].quantizedWeight();
            NDArray data = stackParts(blocks, QuantizedTensor::data);
            NDArray scales = stackParts(blocks, QuantizedTensor::scales);
            NDArray zeros = first.zeros().isPresent() ? stackParts(blocks, t -> t.zeros().orElseThrow()) : null;
            NDArray inputScales =
                    first.inputScales().isPresent() ? stackParts(blocks, t -> t.inputScales().orElseThrow()) : null;
            Object[] handles = new Object[e];
            for (int i = 0; i < e; i++) {
                QuantizedTensor t = blocks[i].quantizedWeight();
                handles[i] = adopt(t.data(), data, i);
                adopt(t.scales(), scales, i);
                if (zeros != null) {
                    adopt(t.zeros().orElseThrow(), zeros, i);
                }
                if (inputScales != null) {
                    adopt(t.inputScales().orElseThrow(), inputScales, i);
                }
            }
            return new QuantizedStack(first, data, scales, zeros, inputScales, blocks, handles);
        }

        private static NDArray stackParts(QuantizedLinear[] blocks, Function<QuantizedTensor, NDArray> part) {
            NDList list = new NDList(blocks.length);
            for (QuantizedLinear b : blocks) {
                list.add(part.apply(b.quantizedWeight()));
            }
            return stackArrays(list);
        }

        @Override
        Device device() {
            return data.getDevice();
        }

        @Override
        NDArray gather(NDArray ids, DataType type) {
            long c = ids.getShape().get(0);
            NDArray w; // (c, out, in) FP32, as the scheme handlers dequantize
            if (scheme == QuantScheme.INT8_WEIGHT_ONLY) {
                w = rows(data, ids).toType(DataType.FLOAT32, false).mul(rows(scales, ids)); // (c, out, in) * (c, out, 1)
            } else {
                long groups = in / groupSize;
                NDArray q = Int4Packing.unpack(rows(data, ids)); // (c, out, in) FP32 in 0..15
                NDArray z = rows(zeros, ids).toType(DataType.FLOAT32, false).reshape(c, out, groups, 1);
                NDArray s = rows(scales, ids).reshape(c, out, groups, 1);
                w = q.reshape(c, out, groups, groupSize).sub(z).mul(s).reshape(c, out, in);
            }
            if (inputScales != null) {
                w = w.div(rows(inputScales, ids).expandDims(1)); // / (c, 1, in)
            }
            return w.toType(type, false);
        }

        @Override
        boolean isCurrent(Block projection, int e) {
            return projection == blocks[e]
                    && Objects.equals(handle(blocks[e].quantizedWeight().data()), handles[e]);
        }
    }

    /**
     * {@link LoraLinear} experts (over plain or quantized bases): the base stacked as above, the adapters as
     * {@code A (E, r, in)} and {@code B (E, out, r)}; the output is the base's plus {@code scale (x A^T) B^T}, computed
     * as {@link LoraLinear} does at inference (adapters cast to the input's type, the delta cast to the base output's).
     */
    private static final class LoraStack extends Stack {
        private final Stack base;
        private final NDArray a; // (E, r, in)
        private final NDArray b; // (E, out, r)
        private final float scale;
        private final LoraLinear[] blocks;
        private final NDArray[] arrays; // per expert: A, B
        private final Object[] handles;

        private LoraStack(Stack base, NDArray a, NDArray b, float scale, LoraLinear[] blocks, NDArray[] arrays,
                Object[] handles) {
            super(base.out, base.in);
            this.base = base;
            this.a = a;
            this.b = b;
            this.scale = scale;
            this.blocks = blocks;
            this.arrays = arrays;
            this.handles = handles;
        }

        static LoraStack build(Block[] projections) {
            int e = projections.length;
            LoraLinear[] blocks = new LoraLinear[e];
            Block[] bases = new Block[e];
            NDList as = new NDList(e);
            NDList bs = new NDList(e);
            for (int i = 0; i < e; i++) {
                blocks[i] = (LoraLinear) projections[i];
                bases[i] = blocks[i].base();
                as.add(blocks[i].loraA().getArray());
                bs.add(blocks[i].loraB().getArray());
            }
            Stack base = stackOf(bases);
            NDArray a = stackArrays(as); // (E, r, in)
            NDArray b = stackArrays(bs); // (E, out, r)
            NDArray[] arrays = new NDArray[2 * e];
            Object[] handles = new Object[2 * e];
            for (int i = 0; i < e; i++) {
                arrays[2 * i] = as.get(i);
                arrays[2 * i + 1] = bs.get(i);
                handles[2 * i] = adopt(arrays[2 * i], a, i);
                handles[2 * i + 1] = adopt(arrays[2 * i + 1], b, i);
            }
            return new LoraStack(base, a, b, blocks[0].scale(), blocks, arrays, handles);
        }

        @Override
        NDArray gather(NDArray ids, DataType type) {
            throw new UnsupportedOperationException("a LoRA projection is applied by project(), not materialised");
        }

        @Override
        NDArray project(NDArray ids, NDArray x, DataType type) {
            NDArray y = base.project(ids, x, type); // (c, 1, out)
            NDArray down = times(rows(a, ids).toType(type, false), x); // (c, 1, r)
            NDArray up = times(rows(b, ids).toType(type, false), down); // (c, 1, out)
            NDArray delta = Scalars.mul(up, scale);
            return y.add(delta.toType(y.getDataType(), false));
        }

        @Override
        boolean isCurrent(Block projection, int e) {
            LoraLinear l = blocks[e];
            return projection == l
                    && base.isCurrent(l.base(), e)
                    && l.loraA().getArray() == arrays[2 * e]
                    && l.loraB().getArray() == arrays[2 * e + 1]
                    && Objects.equals(handle(arrays[2 * e]), handles[2 * e])
                    && Objects.equals(handle(arrays[2 * e + 1]), handles[2 * e + 1]);
        }

        @Override
        Device device() {
            return base.device();
        }
    }

    /** {@code torch.stack} of the arrays {@code (E, ...)}, a leaf outside any scope, in the first array's manager. */
    private static NDArray stackArrays(NDList arrays) {
        NDArray stacked = NDArrays.stack(arrays);
        NDArray stack = stacked.stopGradient(); // a leaf even if built while autograd records
        stacked.close();
        NDScope.unregister(stack);
        return stack;
    }

    /**
     * Makes {@code array} a view of {@code stack[i]} in place and releases its own storage: the Java object stays the
     * same ({@code intern} swaps the native tensor under it), so parameters, parameter stores, optimizers and
     * quantized tensors that hold it now read the stack. On CPU an array loaded from a Java direct buffer keeps that
     * buffer referenced after {@code intern}; it is released here as {@code close} would (see {@link HostBuffers}).
     *
     * @return the array's new native handle, to detect a later replacement
     */
    private static Object adopt(NDArray array, NDArray stack, int i) {
        boolean grad = array.hasGradient();
        NDArray view = stack.get(i); // shares the stack's storage
        NDScope.unregister(view);
        array.intern(view); // deletes the array's own tensor
        HostBuffers.release(array);
        if (grad) {
            array.setRequiresGradient(true);
        }
        return handle(array);
    }

    /** The native handle (null once closed; another value after {@code intern}). */
    private static Object handle(NDArray a) {
        if (!(a instanceof NativeResource)) {
            return a;
        }
        NativeResource<?> r = (NativeResource<?>) a;
        return r.isReleased() ? null : r.getHandle();
    }
}
