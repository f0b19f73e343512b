package ai.djl.memopt.model.deepseek;

import ai.djl.Device;
import ai.djl.memopt.nn.StackableProjection;
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
import ai.djl.nn.core.Embedding;
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
 * objects stay the same ({@code NDArray.intern}): a {@code Linear}'s parameter, a parameter store or predictor that
 * cached it, an optimizer, a quantized tensor all keep working and now read and write the stack, so in-place
 * updates (an optimizer step) are seen by the gathered path. Replacing an expert's projection block or interning a
 * new array into it afterwards is detected by {@link #isCurrent} (block identity and native handle), and the owner
 * rebuilds.
 *
 * <p><b>Forward</b> (inference only: gradients do not reach the stacks). Per chunk of {@code c} assignments (token,
 * choice) in token-major order: {@code W = stack[ids]} {@code (c, out, in)} (an {@code index_select} through the
 * embedding op), then the projection's own {@link StackableProjection#project} (quantized: only the gathered rows are
 * dequantized, with the quantized tensor's formula), {@code W x^T (c, out, 1) -> (c, 1, out)},
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
        return StackableProjection.mismatch(first, b);
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
            stacks[p] = Stack.build(blocks);
        }
        return new GatheredExperts(mlps, stacks);
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

    /**
     * The stacks {@code gate (E, I, H), up (E, I, H), down (E, H, I)} when every projection is a plain bias-free
     * {@code Linear} (one weight array each), else null.
     */
    List<NDArray> plainStacks() {
        List<NDArray> out = new ArrayList<>(3);
        for (Stack s : stacks) {
            if (!(s.kind instanceof StackableProjection.LinearRows) || s.stacks.length != 1) {
                return null;
            }
            out.add(s.stacks[0]);
        }
        return List.copyOf(out);
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

    /**
     * One projection of all experts: each of the projections' {@link StackableProjection#weightArrays() weight arrays}
     * stacked {@code (E, ...)}, the per-expert arrays turned into views of the stacks.
     */
    private static final class Stack {
        final long out;
        final long in;
        private final StackableProjection kind; // expert 0's, which computes for all
        private final NDArray[] stacks; // one per weight array: (E, ...)
        private final Block[] blocks;
        private final NDArray[][] arrays; // per expert: the weight arrays that became views
        private final Object[][] handles; // their native handles after adoption

        private Stack(StackableProjection kind, NDArray[] stacks, Block[] blocks, NDArray[][] arrays,
                Object[][] handles) {
            this.out = kind.outFeatures();
            this.in = kind.inFeatures();
            this.kind = kind;
            this.stacks = stacks;
            this.blocks = blocks;
            this.arrays = arrays;
            this.handles = handles;
        }

        /** Stacks one projection of every expert (all of one kind, checked by {@link #kindMismatch}). */
        static Stack build(Block[] blocks) {
            int e = blocks.length;
            NDArray[][] arrays = new NDArray[e][];
            for (int i = 0; i < e; i++) {
                List<NDArray> weights = StackableProjection.of(blocks[i]).weightArrays();
                arrays[i] = new NDArray[weights.size()];
                for (int j = 0; j < arrays[i].length; j++) {
                    arrays[i][j] = weights.get(j);
                }
            }
            NDArray[] stacks = new NDArray[arrays[0].length];
            for (int j = 0; j < stacks.length; j++) {
                NDList list = new NDList(e);
                for (int i = 0; i < e; i++) {
                    list.add(arrays[i][j]);
                }
                stacks[j] = stackArrays(list);
            }
            Object[][] handles = new Object[e][stacks.length];
            for (int i = 0; i < e; i++) {
                for (int j = 0; j < stacks.length; j++) {
                    handles[i][j] = adopt(arrays[i][j], stacks[j], i);
                }
            }
            return new Stack(StackableProjection.of(blocks[0]), stacks, blocks, arrays, handles);
        }

        /** {@code x (c, 1, in)} through the chosen experts' projections: {@code (c, 1, out)}. */
        NDArray project(NDArray ids, NDArray x, DataType type) {
            List<NDArray> rows = new ArrayList<>(stacks.length);
            for (NDArray stack : stacks) {
                rows.add(rows(stack, ids)); // (c, ...)
            }
            return kind.project(rows, x, type);
        }

        /** Whether {@code projection}, expert {@code e}'s block now, still runs on this stack. */
        boolean isCurrent(Block projection, int e) {
            if (projection != blocks[e]) {
                return false;
            }
            // a Linear's weight Parameter is fixed, but its array can be swapped (precision) or interned
            List<NDArray> now = StackableProjection.of(projection).weightArrays();
            if (now.size() != arrays[e].length) {
                return false;
            }
            for (int j = 0; j < now.size(); j++) {
                if (now.get(j) != arrays[e][j] || !Objects.equals(handle(arrays[e][j]), handles[e][j])) {
                    return false;
                }
            }
            return true;
        }

        Device device() {
            return stacks[0].getDevice();
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
