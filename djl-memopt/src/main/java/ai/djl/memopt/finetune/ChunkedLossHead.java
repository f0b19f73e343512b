package ai.djl.memopt.finetune;

import ai.djl.memopt.checkpoint.CheckpointingGradientCollector;
import ai.djl.memopt.checkpoint.SegmentListener;
import ai.djl.memopt.model.deepseek.CausalLmLoss;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.PhaseTimer;
import ai.djl.memopt.nn.Scalars;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;

/**
 * Forward and backward of a training micro-batch, built around its loss head ({@code lm_head}, softmax, cross-entropy):
 * the decoder's final hidden states {@code (b, T, H)} become the mean next-token loss, and its gradient flows into
 * {@code lm_head} and the decoder stack (through the checkpointing gradient collector when layers are checkpointed, and
 * into the token embedding row by row, {@link EmbeddingRows}). With more positions than one chunk holds, the head runs
 * in chunks of positions ({@link #chunkedLoss}), so that the {@code (b, T, vocab)} logits and their gradients never
 * exist at once; a plain head's chunks are differentiated by hand ({@link #headChunk}) so its weight gradient is added
 * into the gradient buffer in blocks of vocabulary rows.
 *
 * <p>Losses stay on the device: each micro-batch's mean loss is a detached FP32 scalar that the caller sums and reads
 * once per step, after the update is queued (on a GPU a host read waits for all the work queued before it). In the
 * GPU form ({@link #gpuForms}) the head's weight gradient is one product per chunk instead of blocks of vocabulary
 * rows: there the blocks only multiply the kernel launches, and the device has the memory. The phases of a step are
 * timed for {@code bench train --profile} ({@link PhaseTimer}: forward, loss head, backward, embedding gradient).
 *
 * <pre>{@code
 * NDArray loss = head.forwardBackward(micro, lossFactor, true, losses); // (b, T) tokens; gradients accumulate
 * }</pre>
 */
final class ChunkedLossHead {

    private final DeepSeekForCausalLM lm;
    private final int chunkTokens;
    private final boolean checkpointed;
    /** The GPU form of the head's weight gradient (one product per chunk); true on a GPU, settable by tests. */
    boolean gpuForms;
    /** Told when gradients complete during a checkpointed backward ({@link FusedUpdate}); null for none. */
    SegmentListener segmentListener;
    /** Whether the row-wise embedding gradient creates its buffer after the backward ({@link EmbeddingRows#gather}). */
    boolean embeddingBufferOnDemand;
    /** Micro-batches whose embedding gradient went row by row, and head chunks differentiated by hand (for tests). */
    long rowwiseEmbeddings;
    long manualChunks;
    /** Segment recomputations of the last micro-batch's checkpointed backward, retries included (for tests). */
    long lastCollectorRecomputations;

    /**
     * @param chunkTokens about this many tokens ({@code rows x positions}, at least 8 positions) per chunk
     * @param checkpointed whether layers of {@code lm} are checkpointed (the backward goes through their collector)
     */
    ChunkedLossHead(DeepSeekForCausalLM lm, int chunkTokens, boolean checkpointed) {
        this.lm = lm;
        this.chunkTokens = chunkTokens;
        this.checkpointed = checkpointed;
        this.gpuForms = lm.manager().getDevice().isGpu();
    }

    /**
     * Forward and backward of one micro-batch with the loss times {@code lossFactor}; returns its mean loss, a detached
     * FP32 scalar on the device attached to {@code losses}. Gradients accumulate into the parameters.
     *
     * @param rowwise whether the embedding gradient may go row by row and a plain head's chunks be differentiated by
     *     hand (off only to compare with autograd)
     */
    NDArray forwardBackward(TokenBatch micro, float lossFactor, boolean rowwise, NDManager losses) {
        try (GradientCollector gc = openCollector(lm.manager())) {
            NDArray loss = forwardBackward(micro, lossFactor, rowwise, losses, gc);
            if (gc instanceof CheckpointingGradientCollector) {
                lastCollectorRecomputations = ((CheckpointingGradientCollector) gc).recomputedSegments();
            }
            return loss;
        }
    }

    /** The collector this head's backward needs: the checkpointing one when layers are checkpointed. */
    GradientCollector openCollector(NDManager manager) {
        return checkpointed ? CheckpointingGradientCollector.open(manager) : manager.getEngine().newGradientCollector();
    }

    /**
     * {@link #forwardBackward(TokenBatch, float, boolean, NDManager)} through a collector that is already open,
     * possibly on another thread (DJL allows one collector in the process: data-parallel replicas share it, each on its
     * own thread with grad mode on).
     */
    NDArray forwardBackward(TokenBatch micro, float lossFactor, boolean rowwise, NDManager losses,
            GradientCollector gc) {
        try (NDManager m = lm.manager().newSubManager()) {
            NDArray ids = micro.toNDArray(m); // (b, T)
            ParameterStore ps = new LiveParameterStore(m);
            EmbeddingRows embedding = rowwise
                    ? EmbeddingRows.gather(lm.model(), micro.ids(), micro.rows(), micro.seq(),
                            embeddingBufferOnDemand, m)
                    : null;
            rowwiseEmbeddings += embedding != null ? 1 : 0;
            if (gc instanceof CheckpointingGradientCollector) {
                ((CheckpointingGradientCollector) gc).setSegmentListener(segmentListener);
            }
            if (embedding != null && gc instanceof CheckpointingGradientCollector) {
                // gathered from a leaf that requires grad: spares the first layer's native-exception probe, and a
                // retried first layer gets that leaf's gradient put back
                ((CheckpointingGradientCollector) gc).markComputed(embedding.embeddings(), embedding.rows());
            }
            NDArray loss = backward(gc, m, ps, ids, embedding, lossFactor, rowwise);
            loss.attach(losses);
            if (embedding != null) {
                try (PhaseTimer.Phase p = PhaseTimer.phase("embedding gradient")) {
                    embedding.accumulate();
                }
            }
            return loss;
        }
    }

    /**
     * Forward of the decoder and the loss head on {@code ids (b, T)} and backward of the loss times
     * {@code lossFactor}; returns the mean loss, detached, attached to {@code m}.
     *
     * @param embedding the row-wise embedding of {@code ids}, or null to embed through the model
     * @param byHand whether a plain head's chunks may be differentiated by hand (off only to compare with autograd)
     */
    private NDArray backward(GradientCollector gc, NDManager m, ParameterStore ps, NDArray ids, EmbeddingRows embedding,
            float lossFactor, boolean byHand) {
        long rows = ids.getShape().get(0);
        long seq = ids.getShape().get(1);
        int positions = (int) Math.max(8, chunkTokens / rows);
        return positions >= seq - 1
                ? wholeLoss(gc, m, ps, ids, embedding, lossFactor)
                : chunkedLoss(gc, m, ps, ids, embedding, lossFactor, positions, byHand);
    }

    /** Mean next-token loss of a batch without gradients, through the whole head at once; closes what it creates. */
    double evaluate(TokenBatch batch) {
        try (NDManager m = lm.manager().newSubManager()) {
            NDArray ids = batch.toNDArray(m);
            NDArray logits = lm.forward(new ParameterStore(m, false), new NDList(ids), false).head();
            try (NDArray loss = CausalLmLoss.mean(logits, ids)) {
                return loss.getFloat();
            } finally {
                logits.close();
            }
        }
    }

    /** The final hidden states {@code (b, T, H)}, from the row-wise embedding when there is one. */
    private NDArray hidden(ParameterStore ps, NDArray ids, EmbeddingRows embedding) {
        try (PhaseTimer.Phase p = PhaseTimer.phase("forward")) {
            return embedding != null
                    ? lm.model().forwardEmbeddings(ps, embedding.embeddings(), null, true)
                    : lm.model().forward(ps, new NDList(ids), true).head();
        }
    }

    /** The loss head in one piece; returns the mean loss, detached, attached to {@code m}. */
    private NDArray wholeLoss(GradientCollector gc, NDManager m, ParameterStore ps, NDArray ids,
            EmbeddingRows embedding, float lossFactor) {
        NDArray hidden = hidden(ps, ids, embedding); // (b, T, H)
        hidden.attach(m);
        NDArray logits;
        NDArray loss;
        NDArray value;
        try (PhaseTimer.Phase p = PhaseTimer.phase("loss head")) {
            logits = lm.logits(ps, hidden, true); // (b, T, V) FP32
            loss = CausalLmLoss.mean(logits, ids);
            // the collector makes its seed gradient in the loss's manager: keep both in this step's manager
            logits.attach(m);
            loss.attach(m);
            value = loss.stopGradient();
            value.attach(m);
        }
        try (PhaseTimer.Phase p = PhaseTimer.phase("backward")) {
            if (lossFactor == 1f) {
                gc.backward(loss);
            } else {
                try (NDArray scaled = Scalars.mul(loss, lossFactor)) {
                    gc.backward(scaled);
                }
            }
        }
        loss.close();
        logits.close();
        return value;
    }

    /**
     * The loss head in chunks of positions: the final hidden state is cut from the graph as a leaf {@code h}; each chunk
     * computes its logits and loss and back-propagates at once (into {@code lm_head} and the gradient of {@code h}), so
     * only one chunk's {@code (b, c, V)} logits, log-probabilities and their gradients exist at a time instead of the
     * whole {@code (b, T, V)}; then the decoder stack is back-propagated from that gradient (as the scalar
     * {@code sum(hidden * grad)}, whose gradient is {@code grad}, so the checkpointing collector drives it). Chunk
     * {@code [s, e]} predicts tokens {@code s+1..e}; its mean is weighted by its share of the {@code T - 1} targets.
     *
     * <p>Once the head's weight has a gradient buffer, a chunk's projection is differentiated by hand
     * ({@link #headChunk}) so that its weight gradient is added into the buffer in blocks of vocabulary rows: autograd
     * would build the whole {@code (V, H)} weight gradient of every chunk as a temporary before adding it.
     */
    private NDArray chunkedLoss(GradientCollector gc, NDManager m, ParameterStore ps, NDArray ids,
            EmbeddingRows embedding, float lossFactor, int positions, boolean byHand) {
        NDArray hidden = hidden(ps, ids, embedding); // (b, T, H)
        hidden.attach(m);
        NDArray h = hidden.stopGradient();
        h.attach(m);
        h.setRequiresGradient(true);
        NDArray headWeight = byHand ? manualHeadWeight() : null;
        NDArray upstream = headWeight != null ? m.zeros(h.getShape(), h.getDataType(), h.getDevice()) : null;
        long t = ids.getShape().get(1);
        NDArray total = null; // the sum of the chunks' weighted mean losses, on the device
        try (PhaseTimer.Phase head = PhaseTimer.phase("loss head")) {
            for (long s = 0; s < t - 1; s += positions) {
                long e = Math.min(t - 1, s + positions); // positions s..e, targets s+1..e
                double share = (double) (e - s) / (t - 1);
                NDArray part = lossChunk(m, ps, h, ids, s, e, lossFactor * share, headWeight, upstream); // detached
                NDArray weighted = Scalars.mul(part, share);
                weighted.attach(m);
                part.close();
                if (total == null) {
                    total = weighted;
                } else {
                    total.addi(weighted);
                    weighted.close();
                }
            }
            PtNDArray autogradPart = JniUtils.getGradient((PtNDArray) h); // chunks that went through autograd
            if (autogradPart != null) {
                autogradPart.attach(m);
                upstream = upstream == null ? autogradPart : upstream.addi(autogradPart);
            }
        }
        if (upstream == null) {
            return total; // nothing reached the hidden states
        }
        try (PhaseTimer.Phase p = PhaseTimer.phase("backward")) {
            NDArray target = hidden.mul(upstream).sum();
            target.attach(m);
            gc.backward(target);
        }
        return total;
    }

    /**
     * One chunk of the loss head, positions {@code s..e} predicting {@code s+1..e}, back-propagated at once with the
     * factor {@code factor} into the head's weight and {@code h}'s gradient (by hand into {@code upstream} when
     * {@code headWeight} is given and has its gradient buffer); returns the chunk's mean loss, detached, attached to
     * {@code m}.
     */
    private NDArray lossChunk(NDManager m, ParameterStore ps, NDArray h, NDArray ids, long s, long e, double factor,
            NDArray headWeight, NDArray upstream) {
        try (NDManager c = m.newSubManager()) {
            NDArray hc = h.get(new NDIndex(":, {}:{}", s, e + 1)); // (b, c+1, H)
            hc.attach(c);
            NDArray idc = ids.get(new NDIndex(":, {}:{}", s, e + 1)); // (b, c+1)
            idc.attach(c);
            PtNDArray headGrad = headWeight != null ? JniUtils.getGradient((PtNDArray) headWeight) : null;
            NDArray value;
            if (headGrad != null) {
                headGrad.attach(c);
                NDArray slot = upstream.get(new NDIndex(":, {}:{}", s, e + 1)); // (b, c+1, H) view
                slot.attach(c);
                value = headChunk(c, hc, idc, headWeight, headGrad, factor, slot);
                manualChunks++;
            } else {
                NDArray logits = lm.logits(ps, hc, true); // (b, c+1, V) FP32
                logits.attach(c);
                NDArray loss = CausalLmLoss.mean(logits, idc);
                loss.attach(c);
                value = loss.stopGradient();
                backwardScaled(loss, factor, c);
            }
            value.attach(m);
            return value;
        }
    }

    /** Back-propagates {@code loss * factor} through autograd (outside the collector: no graph is kept). */
    private static void backwardScaled(NDArray loss, double factor, NDManager owner) {
        NDArray scaled = Scalars.mul(loss, factor);
        scaled.attach(owner);
        NDArray seed = scaled.onesLike();
        seed.attach(owner);
        JniUtils.backward((PtNDArray) scaled, (PtNDArray) seed, false, false);
    }

    /**
     * The weight of the LM head when its chunks can be differentiated by hand: a plain bias-free {@code Linear}
     * {@code lm_head} (or the tied embedding table) that is trained; null otherwise (a decorated head, e.g. quantized
     * or with adapters, goes through autograd).
     */
    private NDArray manualHeadWeight() {
        Block head = lm.lmHead();
        Parameter p;
        if (head == null) {
            p = lm.model().tokenEmbedding().weight();
        } else if (head.getClass() == Linear.class && head.getParameters().size() == 1
                && head.getParameters().get(0).getKey().equals("weight")) {
            p = head.getParameters().get(0).getValue();
        } else {
            return null;
        }
        NDArray w = p.getArray();
        return p.requiresGradient() && w instanceof PtNDArray ? w : null;
    }

    /**
     * One loss-head chunk differentiated by hand, the ops autograd would run: {@code logits = hc W^T} (in W's type,
     * then FP32), the FP32 loss and its backward to the logits through autograd, then {@code dlogits} in W's type,
     * {@code dh = dlogits W} added into {@code slot}, and {@code dW = dlogits^T hc} added into the weight's gradient
     * buffer in blocks of vocabulary rows (temporaries of {@code rows x H} instead of the whole {@code (V, H)}).
     *
     * @param factor the factor of the chunk's mean loss in the differentiated objective
     * @return the chunk's mean loss, detached, in {@code c}
     */
    private NDArray headChunk(NDManager c, NDArray hc, NDArray idc, NDArray w, NDArray wGrad, double factor,
            NDArray slot) {
        NDArray logits = chunkLogits(c, hc, w);
        logits.setRequiresGradient(true);
        NDArray value;
        try (NDManager l = c.newSubManager()) {
            NDArray loss = CausalLmLoss.mean(logits, idc);
            loss.attach(l);
            value = loss.stopGradient();
            value.attach(c);
            backwardScaled(loss, factor, l);
        }
        PtNDArray dLogits = JniUtils.getGradient((PtNDArray) logits); // (b, c+1, V) FP32
        dLogits.attach(c);
        JniUtils.setGradMode(false);
        try {
            NDArray dl = dLogits;
            if (w.getDataType() != DataType.FLOAT32) {
                dl = dLogits.toType(w.getDataType(), false); // the FP32 cast's backward
                dl.attach(c);
                dLogits.close();
                logits.close();
            }
            NDArray dh = dl.matMul(w); // (b, c+1, H)
            dh.attach(c);
            slot.addi(dh);
            addWeightGradient(c, dl, hc, w, wGrad);
        } finally {
            JniUtils.setGradMode(true);
        }
        return value;
    }

    /** {@code hc W^T} with autograd off, in W's type and then FP32: {@code (b, c+1, V)}. */
    private NDArray chunkLogits(NDManager c, NDArray hc, NDArray w) {
        JniUtils.setGradMode(false);
        try {
            NDArray raw;
            if (lm.lmHead() == null) { // tied to the embedding table
                NDArray wt = w.transpose(); // (H, V) view
                wt.attach(c);
                raw = hc.matMul(wt); // (b, c+1, V) in W's type
            } else {
                raw = JniUtils.linear((PtNDArray) hc, (PtNDArray) w, null); // (b, c+1, V) in W's type
            }
            raw.attach(c);
            NDArray logits = raw.getDataType() == DataType.FLOAT32 ? raw : raw.toType(DataType.FLOAT32, false);
            logits.attach(c);
            if (logits != raw) {
                raw.close(); // the FP16 logits are not needed once the FP32 ones exist
            }
            return logits;
        } finally {
            JniUtils.setGradMode(true);
        }
    }

    /** Adds {@code dl^T hc} ({@code (V, H)}) into {@code wGrad} in blocks of vocabulary rows (one in the GPU form). */
    private void addWeightGradient(NDManager c, NDArray dl, NDArray hc, NDArray w, NDArray wGrad) {
        long vocab = w.getShape().get(0);
        long width = w.getShape().get(1);
        NDArray dl2 = dl.reshape(-1, vocab); // (n, V)
        dl2.attach(c);
        NDArray x2 = hc.reshape(-1, width); // (n, H)
        x2.attach(c);
        long rows = gpuForms ? vocab
                : Math.max(1, RowBlocks.DEFAULT_BLOCK_ELEMENTS / Math.max(width, dl2.getShape().get(0)));
        for (long r0 = 0; r0 < vocab; r0 += rows) {
            long r1 = Math.min(vocab, r0 + rows);
            try (NDManager b = c.newSubManager()) {
                NDArray cols = dl2.get(new NDIndex(":, {}:{}", r0, r1)); // (n, rows) view
                cols.attach(b);
                NDArray part = cols.transpose().matMul(x2); // (rows, H)
                part.attach(b);
                NDArray target = wGrad.get(new NDIndex("{}:{}", r0, r1)); // (rows, H) view
                target.attach(b);
                target.addi(part);
            }
        }
    }
}
