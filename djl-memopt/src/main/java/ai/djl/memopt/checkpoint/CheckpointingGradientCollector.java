package ai.djl.memopt.checkpoint;

import ai.djl.engine.Engine;
import ai.djl.memopt.checkpoint.SegmentRecorder.ThreadState;
import ai.djl.memopt.nn.PhaseTimer;
import ai.djl.memopt.nn.Scalars;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.nn.Block;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Deque;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;

/**
 * A {@link GradientCollector} that drives activation checkpointing: {@link CheckpointBlock}s record a segment (block,
 * input, detached output) in each training forward on this thread; {@link #backward(NDArray)} runs the loss backward,
 * then visits the segments in reverse order, recomputes each with autograd on and back-propagates the gradient that
 * arrived at its output into it ({@code JniUtils.backward(output, upstreamGrad, ...)}, a vector-Jacobian product).
 * DJL has no custom autograd functions, so this ordering is what makes the gradients exact.
 *
 * <p>Why reverse forward order is enough: a segment's output can only feed segments recorded after it, so when a
 * segment is visited every contribution to its output gradient (loss path, residual connections, later segments) has
 * arrived. Gradients accumulate in PyTorch, so an input used by several segments, a parameter shared by several
 * segments and residual connections all sum correctly.
 *
 * <p>Freeing as it goes: a recomputed segment is back-propagated without {@code retain_graph}, so autograd frees each
 * saved tensor of the recomputation as soon as its node has run (a decoder layer's saved activations do not all wait
 * for the end of its backward). The graph is retained only where a later visit may traverse it again: in the loss
 * backward when some segment's input may carry a graph of its own (computed with autograd outside any segment, like
 * the embeddings feeding the first layer), and in the backward of such a segment while another such segment is still
 * to be visited (the two may share that graph). Retained saved tensors are freed when the arrays of the step are
 * closed, as after any DJL step.
 *
 * <p>Nested checkpointing: a {@link CheckpointBlock} inside a checkpointed block (a decoder layer's attention and MLP
 * inside the checkpointed layer) passes through in the forward, which runs without autograd anyway; while the outer
 * block is recomputed it records its own segment, exactly as in a forward, and after the outer block's backward the
 * inner segments are visited in reverse, each recomputed and back-propagated on its own, with the same rules. Only
 * one inner block's saved activations exist at a time instead of the whole outer block's, for one more forward of
 * each inner block.
 *
 * <p>Retries: a {@link SegmentListener} told after each outermost segment's backward may ask for the segment to be
 * back-propagated again with its upstream gradients multiplied by a factor (an FP16 caller lowering the loss scale for
 * that segment and the ones after it). The collector then puts back the gradients of the leaves the failed attempt may
 * have reached ({@link LeafGuard}: the outputs of earlier segments it reads and, where its input carries a graph, every
 * segment output still to visit and the leaves given to {@link #markComputed(NDArray, NDArray...)}), scales the
 * upstream gradients it holds, and recomputes and back-propagates the segment again, nested segments included. For a
 * listener that may retry, a segment whose input carries a graph keeps it through its backward (the retry traverses it
 * again); it is freed when the segment is done, as its input handle is closed.
 *
 * <p>DJL allows one gradient collector in the process: this class opens the engine's own collector and delegates to
 * it (grad mode, {@link #zeroGradients()}, the one-collector check), so the rule keeps holding. Use it instead of
 * {@code trainer.newGradientCollector()}, through {@link CheckpointingTrainer}, or directly:
 *
 * <pre>{@code
 * try (GradientCollector gc = CheckpointingGradientCollector.open(manager)) {
 *     NDArray loss = lossFn.evaluate(labels, model.forward(ps, inputs, true));
 *     gc.backward(loss);
 * }
 * }</pre>
 */
public final class CheckpointingGradientCollector implements GradientCollector {

    private static final AtomicReference<CheckpointingGradientCollector> ACTIVE = new AtomicReference<>();

    private final GradientCollector delegate;
    private final Map<Thread, ThreadState> states = new ConcurrentHashMap<>();
    private volatile boolean closed;
    private final AtomicLong recorded = new AtomicLong();
    private final AtomicLong retainedBackwards = new AtomicLong();
    private final AtomicLong recomputed = new AtomicLong();
    private final AtomicLong retried = new AtomicLong();
    private volatile SegmentListener segmentListener;

    /** Retries of one segment in one backward beyond which the listener is taken to be looping. */
    static final int MAX_RETRIES = 64;

    /**
     * Opens a collector on an engine.
     *
     * @throws IllegalStateException if another gradient collector is open in the process
     */
    public CheckpointingGradientCollector(Engine engine) {
        boolean pytorch = "PyTorch".equals(engine.getEngineName());
        boolean gradMode = pytorch && JniUtils.isGradMode();
        GradientCollector opened;
        try {
            opened = engine.newGradientCollector();
        } catch (IllegalStateException e) {
            if (pytorch) {
                // PtGradientCollector switches grad mode on before it finds the other collector
                JniUtils.setGradMode(gradMode);
            }
            throw new IllegalStateException(
                    "cannot open a CheckpointingGradientCollector: another GradientCollector is open in this process"
                            + " (DJL allows one at a time); close it first",
                    e);
        }
        if (!ACTIVE.compareAndSet(null, this)) {
            opened.close();
            throw new IllegalStateException("another CheckpointingGradientCollector is open in this process");
        }
        this.delegate = opened;
    }

    /** Opens a collector on the engine of {@code manager}. */
    public static CheckpointingGradientCollector open(NDManager manager) {
        return new CheckpointingGradientCollector(manager.getEngine());
    }

    /** The open collector, or null. */
    static CheckpointingGradientCollector active() {
        return ACTIVE.get();
    }

    /** Number of segments recorded on this thread and not yet back-propagated (for tests and diagnostics). */
    public int pendingSegments() {
        ThreadState st = states.get(Thread.currentThread());
        return st == null ? 0 : st.segments.size();
    }

    /** Segments recorded since this collector was opened, on all threads (for tests and diagnostics). */
    public long recordedSegments() {
        return recorded.get();
    }

    /**
     * Recomputed segments whose backward kept their graph ({@code retain_graph}) since this collector was opened, on
     * all threads (for tests and diagnostics): see the class doc for when that is needed.
     */
    public long retainedSegmentBackwards() {
        return retainedBackwards.get();
    }

    /**
     * Segment recomputations since this collector was opened, on all threads, nested and retried ones included (for
     * tests and diagnostics: a forward of a checkpointed block beyond the training forward).
     */
    public long recomputedSegments() {
        return recomputed.get();
    }

    /** Segment backwards run again at a listener's request since this collector was opened (see {@link SegmentListener}). */
    public long retriedSegments() {
        return retried.get();
    }

    /**
     * Tells {@code listener} when gradients are complete, during each {@link #backward}: once after the target's own
     * backward (what lies between the target and the last segment, such as the final norm and the LM head, has its
     * gradient then), and after each outermost segment's backward, nested segments included: the gradients of
     * parameters that only its blocks use are final at that moment (a fused optimizer update applies and frees them
     * there), unless the listener asks for the segment to be retried; and after each nested segment's backward
     * ({@link SegmentListener#nestedSegmentDone}). Null removes it.
     */
    public void setSegmentListener(SegmentListener listener) {
        this.segmentListener = listener;
    }

    /** {@inheritDoc} */
    @Override
    public void backward(NDArray target) {
        Preconditions.checkState(!closed, "the gradient collector is closed");
        ThreadState st = state();
        Deque<Segment> segments = st.segments;
        st.segments = new ArrayDeque<>();
        st.leaves.clear();
        st.computed.clear();
        st.guarded = st.registered;
        st.registered = new ArrayList<>();
        if (segments.isEmpty() || !(target instanceof PtNDArray)) {
            delegate.backward(target);
            return;
        }
        try {
            try (NDArray ones = target.onesLike()) {
                JniUtils.backward((PtNDArray) target, (PtNDArray) ones, withGraph(segments) > 0, false);
            }
            SegmentListener listener = segmentListener;
            if (listener != null) {
                List<NDArray> reached = new ArrayList<>();
                if (listener.mayRetry()) { // the loss's backward may reach any segment output
                    reached.addAll(st.guarded);
                    segments.forEach(s -> reached.addAll(s.outputs));
                }
                SegmentListener.Verdict v = tell(listener, "", List.of(), 0, false, LeafGuard.distinct(reached));
                Preconditions.checkState(!v.retries(),
                        "a segment listener asked to retry the target's own backward; only segments can be retried");
            }
            visit(st, segments, false);
        } finally {
            segments.forEach(Segment::close);
            st.guarded = List.of();
        }
    }

    /** Calls the listener with the gradients of {@code leaves} (when it may retry), closing those handles after. */
    private static SegmentListener.Verdict tell(SegmentListener listener, String name, List<Block> blocks, int attempt,
            boolean inputHasGraph, List<NDArray> leaves) {
        List<NDArray> grads = listener.mayRetry() ? LeafGuard.gradients(leaves) : List.of();
        try {
            return listener.segmentDone(new SegmentListener.Event(name, blocks, attempt, inputHasGraph, grads));
        } finally {
            grads.forEach(NDArray::close);
        }
    }

    private static int withGraph(Deque<Segment> segments) {
        int n = 0;
        for (Segment s : segments) {
            n += s.inputHasGraph ? 1 : 0;
        }
        return n;
    }

    /**
     * Recomputes and back-propagates {@code segments} in reverse order, once the gradients of their outputs are
     * complete. A segment's backward keeps its graph when its input carries one that a later visit may traverse again:
     * another segment of the list reading a computed input, or, for the segments nested in a recomputed segment, the
     * enclosing segment's own need ({@code keepInputGraph}), since they reach the graph behind its input.
     */
    private void visit(ThreadState st, Deque<Segment> segments, boolean keepInputGraph) {
        int withGraph = withGraph(segments);
        while (!segments.isEmpty()) {
            Segment s = segments.pollLast();
            if (s.inputHasGraph) {
                withGraph--;
            }
            boolean retain = s.inputHasGraph && (withGraph > 0 || keepInputGraph);
            backward(st, s, retain, segments);
        }
    }

    /**
     * Tells the collector that {@code x}, which the caller computed with autograd on (e.g. token embeddings gathered from
     * a leaf that requires grad), carries a graph, so that a checkpointed block taking it as input does not have to
     * ask: DJL can only find out through a native exception, which costs milliseconds (torch records a backtrace).
     * Forgotten at the next {@link #backward}.
     */
    public void markComputed(NDArray x) {
        state().computed.put(x, Boolean.TRUE);
    }

    /**
     * {@link #markComputed(NDArray)}, naming the leaves requiring grad that {@code x} was computed from (the gathered
     * embedding rows): a segment whose backward is retried ({@link SegmentListener}) gets their gradients put back too.
     * The caller keeps them open until the backward ends. Forgotten at the next {@link #backward}.
     */
    public void markComputed(NDArray x, NDArray... leaves) {
        state().computed.put(x, Boolean.TRUE);
        for (NDArray leaf : leaves) {
            markLeaf(leaf);
        }
    }

    /**
     * Names a leaf requiring grad, outside any segment, that a segment's backward may reach through a computed input
     * (the embedding rows, a residual stream's input): a segment whose backward is retried ({@link SegmentListener})
     * gets its gradient put back. The caller keeps it open until the backward ends. Forgotten at the next
     * {@link #backward}.
     */
    public void markLeaf(NDArray leaf) {
        state().registered.add(leaf);
    }

    /** {@inheritDoc} */
    @Override
    public void zeroGradients() {
        delegate.zeroGradients();
    }

    /** {@inheritDoc} */
    @Override
    public void close() {
        if (closed) {
            return;
        }
        closed = true;
        for (ThreadState st : states.values()) {
            for (Segment seg : st.segments) {
                seg.close();
            }
        }
        states.clear();
        ACTIVE.compareAndSet(this, null);
        delegate.close();
    }

    private ThreadState state() {
        return states.computeIfAbsent(Thread.currentThread(), t -> new ThreadState());
    }

    /** Called by {@link CheckpointBlock} in a training forward with autograd recording. */
    NDList forward(CheckpointBlock cb, ParameterStore ps, NDList inputs, PairList<String, Object> params) {
        ThreadState st = state();
        int before = st.segments.size();
        NDList out = SegmentRecorder.forward(st, cb, ps, inputs, params);
        recorded.addAndGet(st.segments.size() - before);
        return out;
    }

    /**
     * Recomputes and back-propagates {@code s} from the gradients that arrived at its outputs, visits the segments
     * nested in it, and for an outermost segment tells the listener, retrying as it asks; {@code pending} are the
     * segments of the same level still to visit.
     */
    private void backward(ThreadState st, Segment s, boolean retain, Deque<Segment> pending) {
        List<NDArray> grads = new ArrayList<>(s.outputs.size());
        boolean any = false;
        for (NDArray leaf : s.outputs) {
            NDArray g = null;
            if (leaf.hasGradient()) {
                g = JniUtils.getGradient((PtNDArray) leaf);
            }
            grads.add(g);
            any |= g != null;
        }
        SegmentListener listener = st.visiting == 0 ? segmentListener : null; // an outermost segment
        LeafGuard guard = null;
        try {
            List<NDArray> reached = List.of();
            if (listener != null && listener.mayRetry()) {
                List<NDArray> candidates = new ArrayList<>(s.inputLeaves);
                if (s.inputHasGraph) {
                    pending.forEach(p -> candidates.addAll(p.outputs));
                    candidates.addAll(st.guarded);
                }
                reached = LeafGuard.distinct(candidates);
                guard = any ? LeafGuard.before(reached) : null;
            }
            boolean keep = retain || (guard != null && s.inputHasGraph); // a retry traverses the input's graph again
            if (keep) {
                retainedBackwards.incrementAndGet();
            }
            for (int attempt = 0; ; attempt++) {
                if (st.visiting == 0) {
                    st.attempt = attempt;
                }
                if (any) {
                    recomputeAndBackward(st, s, grads, keep);
                }
                if (listener == null) {
                    if (st.visiting > 0 && segmentListener != null) {
                        segmentListener.nestedSegmentDone(new SegmentListener.Event(s.name, s.blocks, st.attempt,
                                s.inputHasGraph, List.of()));
                    }
                    return;
                }
                SegmentListener.Verdict v = tell(listener, s.name, s.blocks, attempt, s.inputHasGraph, reached);
                if (!v.retries()) {
                    return;
                }
                Preconditions.checkState(guard != null, "the segment listener asked to retry checkpointed block '%s',"
                        + " but %s", s.name, any ? "its mayRetry() is false" : "nothing was back-propagated into it");
                Preconditions.checkState(attempt < MAX_RETRIES, "the segment listener asked to retry checkpointed"
                        + " block '%s' more than %s times", s.name, MAX_RETRIES);
                for (int i = 0; i < grads.size(); i++) { // scaled before the leaves are zeroed: one may share storage
                    NDArray g = grads.get(i);
                    if (g != null) {
                        NDArray scaled = Scalars.mul(g, v.retryFactor());
                        g.close();
                        grads.set(i, scaled);
                    }
                }
                guard.restore();
                retried.incrementAndGet();
            }
        } finally {
            for (NDArray g : grads) {
                if (g != null) {
                    g.close();
                }
            }
            if (guard != null) {
                guard.close();
            }
            s.close();
        }
    }

    /** One recomputation of {@code s}, the backward of {@code grads} through it, and the visit of its nested segments. */
    private void recomputeAndBackward(ThreadState st, Segment s, List<NDArray> grads, boolean retain) {
        for (NDArray x : s.inputs) {
            if (x.isReleased()) {
                throw new IllegalStateException(
                        "the input of checkpointed block '" + s.name + "' was freed before backward: its NDManager"
                                + " was closed; keep the step's manager open until the gradients are computed");
            }
        }
        // checkpointed blocks inside this one record their own segments while it is recomputed (nested
        // checkpointing): they are visited after its backward, while its recomputed graph still exists
        Deque<Segment> nested = new ArrayDeque<>();
        st.visiting++;
        recomputed.incrementAndGet();
        int level = st.visiting; // 1: the outermost checkpointed blocks, 2: blocks nested in them, ...
        // the recomputation's handles are closed before the nested segments are visited: those keep their own
        // (unregistered) handles and the retained graph, and a listener told of a nested segment creates arrays that
        // must outlive this scope (a fused update's new parameter handles and optimizer state)
        try {
            recomputeAndVjp(st, s, grads, retain, nested, level);
            visit(st, nested, retain);
        } finally {
            st.visiting--;
            nested.forEach(Segment::close);
        }
    }

    /** The recomputation of {@code s} and the backward of {@code grads} through it, in a scope closing its arrays. */
    private void recomputeAndVjp(ThreadState st, Segment s, List<NDArray> grads, boolean retain,
            Deque<Segment> nested, int level) {
        Deque<Segment> enclosing = st.segments;
        Map<NDArray, NDArray> enclosingLeaves = st.leaves;
        st.segments = nested;
        st.leaves = new IdentityHashMap<>();
        st.recomputing++;
        try (NDScope scope = new NDScope()) {
            NDList y;
            try (PhaseTimer.Phase p = PhaseTimer.phase("recompute L" + level)) {
                y = s.inputs;
                for (Block b : s.blocks) {
                    y = b.forward(s.parameterStore, y, true, s.params);
                }
            } finally {
                st.segments = enclosing;
                st.leaves = enclosingLeaves;
                st.spanRun = null;
                st.recomputing--;
            }
            if (s.fingerprint != null) {
                s.fingerprint.verify(y, s.name);
            }
            if (y.size() != grads.size()) {
                throw new IllegalStateException(String.format(
                        "checkpointed block '%s' returned %d outputs when recomputed, %d in the forward",
                        s.name, y.size(), grads.size()));
            }
            List<Integer> todo = new ArrayList<>();
            for (int i = 0; i < grads.size(); i++) {
                if (grads.get(i) != null) {
                    todo.add(i);
                }
            }
            boolean keepForNested = withGraph(nested) > 0;
            try (PhaseTimer.Phase p = PhaseTimer.phase("backward L" + level)) {
                for (int k = 0; k < todo.size(); k++) {
                    int i = todo.get(k);
                    boolean keep = retain || keepForNested || k < todo.size() - 1;
                    AutogradGraph.vjp(y.get(i), grads.get(i), keep);
                }
            }
            scope.suppressNotUsedWarning();
        }
    }
}
