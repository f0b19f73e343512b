package ai.djl.memopt.model.deepseek;

import ai.djl.memopt.precision.Precisions;
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
import java.util.ArrayList;
import java.util.List;

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
 * the experts, the router weight and the input.
 *
 * <p>Shapes: {@code (B, T, hidden) -> (B, T, hidden)}.
 */
public final class DeepSeekMoE extends AbstractBlock {

    private static final byte VERSION = 1;

    private final DeepSeekConfig config;
    private Block gate;
    private final ModuleList experts;
    private Block sharedExperts;

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
            NDArray routed = dispatch(ps, flat, route.get(0), route.get(1), training).reshape(shape);
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
            long n = topkIdx.getShape().get(0);
            int k = (int) topkIdx.getShape().get(1);
            int numExperts = experts.size();
            long[] ids = topkIdx.toType(DataType.INT64, false).toLongArray(); // host sync: (N*k) expert ids
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
            long[] perm = new long[total]; // sorted position -> assignment (token * k + j)
            long[] inverse = new long[total]; // assignment -> sorted position
            long[] tokenOf = new long[total]; // sorted position -> token row
            int[] next = start.clone();
            for (int a = 0; a < total; a++) {
                int pos = next[(int) ids[a]]++;
                perm[pos] = a;
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
            NDArray permIdx = ownedIndex(m, perm, x); // (N*k)
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
            NDArray w = topkWeight.reshape(-1).get(new NDIndex("{}", permIdx)); // (N*k) in sorted order
            NDArray sorted32 = Precisions.cast(sorted, DataType.FLOAT32);
            NDArray weighted = sorted32.mul(w.expandDims(1)); // (N*k, H)
            if (sorted32 != sorted) {
                sorted32.close(); // in FP16 autograd keeps the FP32 copy it saved for the weights' gradient
            }
            NDArray back = weighted.get(new NDIndex("{}", invIdx)); // (N*k, H) token-major
            weighted.close();
            long h = x.getShape().get(1);
            NDArray summed = back.reshape(n, k, h).sum(new int[] {1}); // (N, H) FP32
            back.close();
            return new NDList(Precisions.cast(summed, x.getDataType())); // (N, H)
        }).head();
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
