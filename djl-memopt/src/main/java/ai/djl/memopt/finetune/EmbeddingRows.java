package ai.djl.memopt.finetune;

import ai.djl.memopt.model.deepseek.DeepSeekModel;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import java.util.Arrays;

/**
 * The token-embedding lookup of a training step with its gradient accumulated row by row. Autograd's backward of a
 * row gather builds a dense {@code (vocab, hidden)} gradient (131 MB for a 32000 x 1024 table) and, once the
 * parameter has a gradient buffer (every step after the first, since gradients are zeroed, not freed), adds it into
 * that buffer: a table-sized temporary at the end of every backward. Here the distinct rows of the batch are gathered
 * with autograd off into a small leaf {@code (U, hidden)} that requires grad, the embeddings are gathered from that
 * leaf (so repeated tokens sum into their row, as autograd does), and after the backward the leaf's gradient is added
 * into the {@code U} rows of the table's gradient buffer: temporaries of {@code U x hidden}.
 *
 * <p>Shapes: token ids {@code (B, T)} -> embeddings {@code (B, T, H)} in the table's type.
 */
final class EmbeddingRows {

    private final NDArray table;
    private final NDArray unique;
    private final NDArray rows;
    private final NDArray embeddings;

    private EmbeddingRows(NDArray table, NDArray unique, NDArray rows, NDArray embeddings) {
        this.table = table;
        this.unique = unique;
        this.rows = rows;
        this.embeddings = embeddings;
    }

    /**
     * Gathers the embeddings of {@code ids} for a training forward, or returns null when the row-wise path does not
     * apply (the embedding is decorated or frozen, or its gradient buffer does not exist yet and {@code bufferOnDemand}
     * is false: the first backward then hands autograd's dense gradient over as the buffer without a copy).
     *
     * @param ids the token ids, row-major {@code (b, t)}
     * @param bufferOnDemand whether to go row by row without a gradient buffer, {@link #accumulate} creating it (the
     *     fused update, which frees the buffer every step: a table-sized buffer made at the start of the step would
     *     live through the whole backward, beside every layer's recomputation)
     * @param m the step's manager (owns everything created here)
     */
    static EmbeddingRows gather(DeepSeekModel model, long[] ids, int b, int t, boolean bufferOnDemand, NDManager m) {
        if (model.embedTokens() != model.tokenEmbedding()) {
            return null;
        }
        Parameter p = model.tokenEmbedding().weight();
        NDArray table = p.getArray();
        if (!p.requiresGradient() || !(table instanceof PtNDArray) || !JniUtils.isGradMode()) {
            return null;
        }
        PtNDArray grad = JniUtils.getGradient((PtNDArray) table);
        if (grad == null && !bufferOnDemand) {
            return null;
        }
        if (grad != null) {
            grad.close();
        }
        long[] sorted = ids.clone();
        Arrays.sort(sorted);
        int u = 0;
        for (int i = 0; i < sorted.length; i++) {
            if (i == 0 || sorted[i] != sorted[i - 1]) {
                sorted[u++] = sorted[i];
            }
        }
        long[] distinct = Arrays.copyOf(sorted, u);
        long[] inverse = new long[ids.length];
        for (int i = 0; i < ids.length; i++) {
            inverse[i] = Arrays.binarySearch(distinct, ids[i]);
        }
        NDArray uniqueIdx = owned(m, distinct, new Shape(u), table); // (U)
        NDArray inverseIdx = owned(m, inverse, new Shape(b, t), table); // (b, t)
        NDArray rows;
        JniUtils.setGradMode(false);
        try {
            rows = table.get(new NDIndex("{}", uniqueIdx)); // (U, H), no graph to the table
        } finally {
            JniUtils.setGradMode(true);
        }
        rows.attach(m);
        rows.setRequiresGradient(true);
        NDArray embeddings = rows.get(new NDIndex("{}", inverseIdx)); // (b, t, H)
        embeddings.attach(m);
        return new EmbeddingRows(table, uniqueIdx, rows, embeddings);
    }

    /** The embeddings {@code (b, t, H)}, connected to the autograd graph through the gathered rows. */
    NDArray embeddings() {
        return embeddings;
    }

    /** The gathered rows {@code (U, H)}: the leaf whose gradient {@link #accumulate} adds into the table's. */
    NDArray rows() {
        return rows;
    }

    /**
     * Adds the gradient that reached the gathered rows into the table's gradient buffer (call after the backward); a
     * table without a buffer gets one, zero but for those rows.
     */
    void accumulate() {
        PtNDArray rowGrad = JniUtils.getGradient((PtNDArray) rows);
        if (rowGrad == null) {
            return; // nothing reached the embeddings
        }
        boolean gradMode = JniUtils.isGradMode();
        try (NDManager tmp = table.getManager().newSubManager()) {
            rowGrad.attach(tmp);
            PtNDArray grad = JniUtils.getGradient((PtNDArray) table);
            if (grad == null) {
                // autograd's backward of a gather at distinct rows writes them into a new zero buffer: 0 + g is g, the
                // values the add below would give
                JniUtils.setGradMode(true);
                NDArray gathered = table.get(new NDIndex("{}", unique)); // (U, H), with a graph to the table
                gathered.attach(tmp);
                JniUtils.backward((PtNDArray) gathered, rowGrad, false, false);
                return;
            }
            JniUtils.setGradMode(false);
            grad.attach(tmp);
            NDArray current = grad.get(new NDIndex("{}", unique)); // (U, H) copy
            current.attach(tmp);
            current.addi(rowGrad);
            grad.set(new NDIndex("{}", unique), current); // distinct rows: a plain write
        } finally {
            JniUtils.setGradMode(gradMode);
        }
    }

    /**
     * An index array that owns its memory: {@code manager.create(long[])} on CPU wraps a Java buffer that is freed with
     * its handle, while autograd keeps the indices of a gather for its backward.
     */
    private static NDArray owned(NDManager m, long[] values, Shape shape, NDArray like) {
        try (NDArray wrapped = m.create(values, shape)) {
            NDArray onDevice = wrapped.toDevice(like.getDevice(), false);
            return onDevice == wrapped ? wrapped.duplicate() : onDevice;
        }
    }
}
