package ai.djl.memopt.model.deepseek;

import ai.djl.Device;
import ai.djl.memopt.nn.HostReads;
import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;
import java.util.ArrayList;
import java.util.List;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * DeepSeek mixture of experts: a router ({@link MoeGate}, child {@code gate}), {@code n_routed_experts} SwiGLU experts
 * (child {@code experts}, a {@link ModuleList} of {@link DeepSeekMlp}) and, when {@code n_shared_experts > 0}, one
 * SwiGLU {@code shared_experts} block of width {@code moe_intermediate_size * n_shared_experts} applied to every token.
 *
 * <p>Routed experts run only on the tokens routed to them: the {@code N*k} (token, expert) assignments are sorted by
 * expert on the host (one small device-to-host copy of the chosen expert ids, as transformers' loop over hit experts
 * does), the token rows gathered in that order, each expert with at least one token runs once on its contiguous slice,
 * the outputs are weighted by the router weights in FP32 and gathered back with the inverse permutation, then summed
 * over the {@code k} choices of each token. Every step is an autograd-tracked gather/slice/concat, so gradients reach
 * the experts, the router weight and the input. Training and long inputs (prefill) always take this path.
 *
 * <p><b>Gathered dispatch (decoding, no host read).</b> After {@link #enableGatheredDispatch()} (the inference decoder
 * calls it on a GPU, where a host read stalls the device's queue, or when asked to), a forward with {@code training == false} and at most {@link #gatheredDispatchLimit()} assignments
 * ({@code N*k}; default {@code n_routed_experts}, 8 times that on a GPU) gathers the chosen experts' weights on the device with the expert-id
 * tensor as the index and runs them as batched matmuls: the ids never reach the host, so a decoding step does not
 * wait for the device here. The experts' weights are stacked once per projection and the per-expert arrays become
 * views of the stacks (no second copy; see {@code GatheredExperts}); int8/int4 quantized experts are stacked packed
 * and only the gathered experts are dequantized; LoRA adapters over either are stacked too. Above the limit the sorted path is cheaper: it reads each hit expert
 * once in place, while gathering copies one expert matrix per assignment (in chunks whose FP32 size stays under
 * {@link #setGatherChunkBytes}, 64 MiB by default). Experts of another kind (decorated, other
 * {@code LinearWeightSource}s, a bias, or kinds mixed across experts) keep the sorted path, with one warning. Both paths give the same output up to float rounding (the tests: within 1e-6). The
 * gathered path is inference only: gradients do not reach the experts through it.
 *
 * <p>Shapes: {@code (B, T, hidden) -> (B, T, hidden)}.
 *
 * <pre>{@code
 * moe.enableGatheredDispatch();                  // true if the experts could be stacked
 * NDArray y = moe.forward(ps, new NDList(x), false).head(); // (B, 1, hidden): no host read of the expert ids
 * }</pre>
 */
public final class DeepSeekMoE extends AbstractBlock {

    private static final byte VERSION = 1;
    private static final Logger LOG = LoggerFactory.getLogger(DeepSeekMoE.class);

    /** Default budget of one gathered projection (FP32 bytes) per chunk of assignments in the gathered dispatch. */
    public static final long DEFAULT_GATHER_CHUNK_BYTES = 64L << 20;

    private final DeepSeekConfig config;
    private Block gate;
    private final ModuleList experts;
    private Block sharedExperts;
    private boolean gatheredEnabled;
    private int gatheredLimit = -1; // -1: n_routed_experts
    private long gatherChunkBytes = DEFAULT_GATHER_CHUNK_BYTES;
    private GatheredExperts gathered;
    private List<Block> unsupportedExperts; // the projections a failed stacking saw, so that it warns once

    public DeepSeekMoE(DeepSeekConfig config) {
        super(VERSION);
        this.config = config;
        List<DeepSeekMlp> list = new ArrayList<>();
        for (int i = 0; i < config.nRoutedExperts(); i++) {
            list.add(new DeepSeekMlp(config.hiddenSize(), config.moeIntermediateSize()));
        }
        gate = addChildBlock("gate", new MoeGate(config));
        experts = addChildBlock("experts", new ModuleList(list, new Shape(1, config.hiddenSize())));
        if (config.nSharedExperts() > 0) {
            sharedExperts = addChildBlock("shared_experts",
                    new DeepSeekMlp(config.hiddenSize(), config.moeIntermediateSize() * config.nSharedExperts()));
        }
    }

    /** The router ({@link MoeGate} unless replaced). */
    public Block gate() {
        return gate;
    }

    /** The routed experts, {@code experts.get(i)}. */
    public ModuleList experts() {
        return experts;
    }

    /** The shared experts block, or null when {@code n_shared_experts} is 0. */
    public Block sharedExperts() {
        return sharedExperts;
    }

    /**
     * Lets inference forwards of at most {@link #gatheredDispatchLimit()} assignments take the gathered dispatch (see
     * the class documentation), and stacks the experts now: their per-expert weight arrays become views of one stack
     * per projection. Stacks are rebuilt at the next such forward if an expert's projection or array is replaced.
     *
     * @return true if the experts could be stacked; false (with a warning saying why) if they keep the sorted path
     */
    public synchronized boolean enableGatheredDispatch() {
        gatheredEnabled = true;
        return currentGathered() != null;
    }

    /**
     * Sends every forward to the sorted dispatch again. Stacks already built stay (they are the experts' storage) and
     * are used again after {@link #enableGatheredDispatch()}.
     */
    public synchronized void disableGatheredDispatch() {
        gatheredEnabled = false;
    }

    /**
     * The routed experts' weights stacked per projection, {@code gate (E, I, H), up (E, I, H), down (E, H, I)}, for a
     * decoder that runs the dispatch itself (the TorchScript decode step): stacked now if needed, as
     * {@link #enableGatheredDispatch()} does (the per-expert arrays become views of the stacks), without enabling the
     * gathered dispatch. Null unless every expert projection is a plain bias-free {@code Linear} of one shape and type.
     */
    public synchronized List<NDArray> plainExpertStacks() {
        GatheredExperts g = currentGathered();
        return g == null ? null : g.plainStacks();
    }

    /**
     * The stacks that {@link #plainExpertStacks} made, if they exist and are current, else null; never stacks (so a
     * caller that only counts bytes changes nothing).
     */
    public synchronized List<NDArray> existingExpertStacks() {
        return gathered != null && gathered.isCurrent(experts) ? gathered.plainStacks() : null;
    }

    /** The FP32 byte budget of one gathered projection ({@link #setGatherChunkBytes}). */
    public synchronized long gatherChunkBytes() {
        return gatherChunkBytes;
    }

    /** Whether {@link #enableGatheredDispatch()} was called (and not undone). */
    public synchronized boolean isGatheredDispatchEnabled() {
        return gatheredEnabled;
    }

    /**
     * Most assignments ({@code tokens x num_experts_per_tok}) a forward on the CPU may have to take the gathered
     * dispatch.
     */
    public synchronized int gatheredDispatchLimit() {
        return gatheredLimit < 0 ? experts.size() : gatheredLimit;
    }

    /**
     * The limit on {@code device}: unless set, {@code n_routed_experts} on the CPU and {@link #GPU_GATHER_FACTOR} times
     * that on a GPU, where the sorted path's host read (a wait for the device's queue) and its loop over the experts
     * cost more than copying the chosen experts' matrices (batch 32 of bench-small: 128 assignments).
     */
    public synchronized int gatheredDispatchLimit(Device device) {
        if (gatheredLimit >= 0 || !device.isGpu()) {
            return gatheredDispatchLimit();
        }
        return experts.size() * GPU_GATHER_FACTOR;
    }

    /** The default gathered-dispatch limit on a GPU, in multiples of {@code n_routed_experts}. */
    public static final int GPU_GATHER_FACTOR = 8;

    /**
     * Sets {@link #gatheredDispatchLimit()} (default {@code n_routed_experts}: beyond it gathering copies more expert
     * matrices than the sorted path reads); 0 keeps every forward on the sorted path.
     */
    public synchronized void setGatheredDispatchLimit(int maxAssignments) {
        Preconditions.checkArgument(maxAssignments >= 0, "gathered dispatch limit must be >= 0, got %s", maxAssignments);
        gatheredLimit = maxAssignments;
    }

    /**
     * Sets the budget, in FP32 bytes, of one gathered projection: assignments are processed in chunks of
     * {@code max(1, bytes / (4 x largest expert matrix))} (default {@link #DEFAULT_GATHER_CHUNK_BYTES}).
     */
    public synchronized void setGatherChunkBytes(long bytes) {
        Preconditions.checkArgument(bytes > 0, "gather chunk bytes must be > 0, got %s", bytes);
        gatherChunkBytes = bytes;
    }

    /** The gathered experts when this forward may use them, else null (sorted dispatch). */
    private synchronized GatheredExperts gatheredFor(long assignments, Device device) {
        if (!gatheredEnabled || assignments > gatheredDispatchLimit(device)) {
            return null;
        }
        GatheredExperts g = currentGathered();
        return g != null && g.device().equals(device) ? g : null;
    }

    /** Up-to-date stacks, (re)built if needed, or null if the experts cannot be stacked. */
    private GatheredExperts currentGathered() {
        if (gathered != null && gathered.isCurrent(experts)) {
            return gathered;
        }
        gathered = null;
        List<Block> seen = expertProjections();
        if (seen.equals(unsupportedExperts)) {
            return null;
        }
        String why = GatheredExperts.unsupportedReason(experts);
        if (why != null) {
            unsupportedExperts = seen;
            LOG.warn("MoE with {} routed experts keeps the sorted dispatch (one device-to-host read of the chosen"
                    + " expert ids per forward, also when decoding): {}", experts.size(), why);
            return null;
        }
        unsupportedExperts = null;
        gathered = GatheredExperts.build(experts);
        return gathered;
    }

    /** Every expert block and its three projections, for identity comparison. */
    private List<Block> expertProjections() {
        List<Block> list = new ArrayList<>();
        for (int i = 0; i < experts.size(); i++) {
            Block e = experts.get(i);
            list.add(e);
            if (e instanceof DeepSeekMlp) {
                DeepSeekMlp m = (DeepSeekMlp) e;
                list.add(m.gateProj());
                list.add(m.upProj());
                list.add(m.downProj());
            }
        }
        return list;
    }

    /**
     * The gathered dispatch itself, for tests: same contract as {@link #dispatch}.
     *
     * @throws IllegalStateException if the experts cannot be stacked
     */
    NDArray dispatchGathered(NDArray x, NDArray topkIdx, NDArray topkWeight, long chunkBytes) {
        GatheredExperts g;
        synchronized (this) {
            g = currentGathered();
        }
        Preconditions.checkState(g != null, "the experts cannot be stacked: %s", GatheredExperts.unsupportedReason(experts));
        return g.forward(x, topkIdx, topkWeight, chunkBytes);
    }

    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        Shape in = new Shape(1, config.hiddenSize());
        gate.initialize(manager, dataType, in);
        experts.initialize(manager, dataType, in);
        if (sharedExperts != null) {
            sharedExperts.initialize(manager, dataType, in);
        }
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        NDArray hidden = inputs.head();
        return Scoped.run(() -> {
            Shape shape = hidden.getShape();
            long h = shape.get(shape.dimension() - 1);
            NDArray flat = hidden.reshape(-1, h); // (N, H)
            NDList route = gate.forward(ps, new NDList(flat), training);
            long assignments = route.get(0).getShape().size(); // N*k, from the shape: no device read
            GatheredExperts g = training ? null : gatheredFor(assignments, flat.getDevice());
            NDArray routed = (g != null
                    ? g.forward(flat, route.get(0), route.get(1), gatherChunkBytes)
                    : dispatch(ps, flat, route.get(0), route.get(1), training)).reshape(shape);
            if (sharedExperts != null) {
                routed = routed.add(sharedExperts.forward(ps, new NDList(hidden), training).head());
            }
            return new NDList(routed);
        });
    }

    /**
     * Runs each routed expert on its own tokens and combines the weighted outputs.
     *
     * @param x {@code (N, H)} token rows
     * @param topkIdx {@code (N, k)} chosen expert ids
     * @param topkWeight {@code (N, k)} FP32 routing weights
     * @return {@code (N, H)} in {@code x}'s type
     */
    NDArray dispatch(ParameterStore ps, NDArray x, NDArray topkIdx, NDArray topkWeight, boolean training) {
        return Scoped.run(() -> {
            NDManager m = x.getManager();
            int k = (int) topkIdx.getShape().get(1);
            int numExperts = experts.size();
            long[] ids = HostReads.longs(topkIdx); // host sync: (N*k) expert ids
            int total = ids.length;
            int[] counts = new int[numExperts];
            for (long id : ids) {
                if (id < 0 || id >= numExperts) {
                    throw new IllegalStateException("router chose expert " + id + " of " + numExperts);
                }
                counts[(int) id]++;
            }
            int[] start = new int[numExperts + 1];
            for (int e = 0; e < numExperts; e++) {
                start[e + 1] = start[e] + counts[e];
            }
            // stable counting sort of assignments by expert id
            long[] inverse = new long[total]; // assignment -> sorted position
            long[] tokenOf = new long[total]; // sorted position -> token row
            int[] next = start.clone();
            for (int a = 0; a < total; a++) {
                int pos = next[(int) ids[a]]++;
                inverse[a] = pos;
                tokenOf[pos] = a / k;
            }
            // FP16 matrix products on CPU go through oneDNN, which keeps memory for every new (rows, in, out) shape
            // it meets (measured here: about 0.2 MB per shape, so RSS grew by ~100 MB per training step as the
            // per-expert token counts changed). Each expert's rows are padded to a multiple of `bucket`, which bounds
            // the set of shapes; pad rows repeat the expert's first token and their outputs are dropped, so they
            // receive no gradient and add nothing to any gradient.
            int bucket = x.getDataType() == DataType.FLOAT16 && !x.getDevice().isGpu() ? 32 : 1;
            int[] padded = new int[numExperts + 1]; // start of each expert's padded block
            for (int e = 0; e < numExperts; e++) {
                padded[e + 1] = padded[e] + (counts[e] + bucket - 1) / bucket * bucket;
            }
            long[] gatherOf = new long[padded[numExperts]]; // padded position -> token row
            for (int e = 0; e < numExperts; e++) {
                for (int i = padded[e]; i < padded[e + 1]; i++) {
                    gatherOf[i] = tokenOf[start[e] + Math.min(i - padded[e], counts[e] - 1)];
                }
            }
            NDArray tokenIdx = ownedIndex(m, gatherOf, x); // (P) with P >= N*k
            NDArray invIdx = ownedIndex(m, inverse, x); // (N*k)
            NDArray rows = x.get(new NDIndex("{}", tokenIdx)); // (P, H) grouped by expert
            List<NDArray> outs = new ArrayList<>();
            for (int e = 0; e < numExperts; e++) {
                if (counts[e] == 0) {
                    continue;
                }
                NDArray slice = rows.get(new NDIndex("{}:{}", padded[e], padded[e + 1])); // (padded count, H)
                NDArray out = experts.get(e).forward(ps, new NDList(slice), training).head(); // (padded count, H)
                if (padded[e + 1] - padded[e] != counts[e]) {
                    NDArray kept = out.get(new NDIndex("0:{}", counts[e])); // (count, H)
                    out.close();
                    out = kept;
                }
                outs.add(out);
            }
            NDArray sorted = outs.size() == 1 ? outs.get(0) : NDArrays.concat(new NDList(outs), 0); // (N*k, H)
            if (outs.size() > 1) {
                outs.forEach(NDArray::close); // concatenated; autograd saved none of them
            }
            NDArray back = sorted.get(new NDIndex("{}", invIdx)); // (N*k, H) token-major
            sorted.close(); // the index's backward keeps only the indices
            return new NDList(combine(back, topkWeight));
        }).head();
    }

    /**
     * The weighted sum of each token's {@code k} expert outputs: {@code out (N*k, H)} token-major in the experts' type,
     * {@code topkWeight (N, k)} FP32 -> {@code (N, H)} in the experts' type. Each product is taken in the experts' type
     * and the sum over {@code k} in FP32 (PyTorch would multiply in FP32: this differs by at most one rounding of each
     * product), so that in FP16 training autograd saves the FP16 outputs rather than an FP32 copy, and the
     * combination's gradients are FP16 too. Shared by the sorted and the gathered dispatch, which then agree exactly.
     */
    static NDArray combine(NDArray out, NDArray topkWeight) {
        long n = topkWeight.getShape().get(0);
        long k = topkWeight.getShape().get(1);
        long h = out.getShape().get(1);
        DataType type = out.getDataType();
        NDArray w = TypeCasts.cast(topkWeight.reshape(n * k, 1), type); // (N*k, 1)
        NDArray weighted = out.mul(w); // (N*k, H)
        NDArray weighted32 = TypeCasts.cast(weighted, DataType.FLOAT32);
        if (weighted32 != weighted) {
            weighted.close();
        }
        NDArray summed = weighted32.reshape(n, k, h).sum(new int[] {1}); // (N, H) FP32
        weighted32.close();
        return TypeCasts.cast(summed, type);
    }

    /**
     * An index array whose memory the tensor owns. On CPU {@code manager.create(long[])} wraps a Java direct buffer
     * ({@code from_blob}) that is freed once the Java handle is closed and collected, while autograd keeps the tensor
     * (index backward saves its indices): the backward would then read freed memory. A clone owns its storage.
     */
    private static NDArray ownedIndex(NDManager m, long[] values, NDArray like) {
        try (NDArray wrapped = m.create(values)) {
            NDArray onDevice = wrapped.toDevice(like.getDevice(), false);
            return onDevice == wrapped ? wrapped.duplicate() : onDevice;
        }
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0]};
    }
}
