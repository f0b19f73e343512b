package ai.djl.memopt.checkpoint;

import ai.djl.engine.Engine;
import ai.djl.memopt.nn.PhaseTimer;
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
import java.util.function.Consumer;

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
    private volatile Consumer<List<Block>> segmentListener;

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
     * Tells {@code listener} when gradients are complete, during each {@link #backward}: once with an empty list after
     * the target's own backward (what lies between the target and the last segment, such as the final norm and the
     * LM head, has its gradient then), and after each outermost segment's backward, nested segments included, with the
     * segment's blocks: the gradients of parameters that only those blocks use are final at that moment (a fused
     * optimizer update applies and frees them there). Null removes it.
     */
    public void setSegmentListener(Consumer<List<Block>> listener) {
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
        if (segments.isEmpty() || !(target instanceof PtNDArray)) {
            delegate.backward(target);
            return;
        }
        try {
            try (NDArray ones = target.onesLike()) {
                JniUtils.backward((PtNDArray) target, (PtNDArray) ones, withGraph(segments) > 0, false);
            }
            Consumer<List<Block>> listener = segmentListener;
            if (listener != null) {
                listener.accept(List.of());
            }
            visit(st, segments, false);
        } finally {
            segments.forEach(Segment::close);
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
            if (retain) {
                retainedBackwards.incrementAndGet();
            }
            backward(st, s, retain);
            Consumer<List<Block>> listener = segmentListener;
            if (listener != null && st.visiting == 0) { // an outermost segment, its nested ones visited too
                listener.accept(s.blocks);
            }
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
        Span span = cb.span();
        if (span == null || span.size() == 1) {
            NDList out = forwardNoGrad(cb.delegate(), ps, inputs, params);
            return finish(st, cb.getName(), List.of(cb.delegate()), cb.isVerifyDeterminism(), ps, inputs, params, out);
        }
        int index = cb.spanIndex();
        SpanRun run = st.spanRun;
        if (index == 0) {
            run = new SpanRun(span, inputs);
            st.spanRun = run;
        } else if (run == null || run.span != span || run.next != index || !sameArrays(run.last, inputs)) {
            st.spanRun = null;
            throw new IllegalStateException(String.format(
                    "checkpoint segment '%s' was not run sequentially: its child %d did not receive child %d's output."
                            + " Checkpointing a run of children as one segment (sqrtN) needs a parent that feeds"
                            + " each child's output to the next, like SequentialBlock; use CheckpointPolicy.all()",
                    span.name(), index, index - 1));
        }
        NDList out = forwardNoGrad(cb.delegate(), ps, inputs, params);
        if (index > 0) {
            closeIntermediate(run.last, run.inputs, out);
        }
        if (index < span.size() - 1) {
            run.last = out;
            run.next = index + 1;
            return out;
        }
        st.spanRun = null;
        List<Block> blocks = new ArrayList<>();
        boolean verify = false;
        for (CheckpointBlock m : span.members()) {
            blocks.add(m.delegate());
            verify |= m.isVerifyDeterminism();
        }
        return finish(st, span.name(), blocks, verify, ps, run.inputs, params, out);
    }

    private static NDList forwardNoGrad(Block block, ParameterStore ps, NDList inputs, PairList<String, Object> params) {
        NDManager home = inputs.head().getManager();
        JniUtils.setGradMode(false);
        try (NDScope scope = new NDScope()) {
            NDList out = block.forward(ps, inputs, true, params);
            for (NDArray o : out) {
                NDScope.unregister(o);
                if (!containsSame(inputs, o)) {
                    o.attach(home);
                }
            }
            scope.suppressNotUsedWarning();
            return out;
        } finally {
            JniUtils.setGradMode(true);
        }
    }

    private NDList finish(
            ThreadState st, String name, List<Block> blocks, boolean verify, ParameterStore ps, NDList inputs,
            PairList<String, Object> params, NDList out) {
        boolean inputGrad = false;
        boolean inputHasGraph = false;
        for (NDArray x : inputs) {
            if (!x.getDataType().isFloating()) {
                continue;
            }
            Boolean ours = st.leaves.get(x);
            if (ours != null) {
                inputGrad |= ours; // an earlier segment's output: a view of its leaf, no graph beyond it
            } else if (x.hasGradient()) {
                inputGrad = true; // a leaf that requires grad
            } else if (st.recomputing > 0 || st.computed.containsKey(x) || AutogradGraph.carriesGraph(x)) {
                // inside a recomputation the inputs of nested segments are computed from the recomputed ones, and
                // asking costs a native exception each (tens of ms with torch's backtrace): assume a graph
                inputGrad = true;
                inputHasGraph = true;
            }
        }
        boolean needsGrad = inputGrad || AutogradGraph.anyParameterRequiresGrad(blocks);
        Fingerprint fingerprint = verify && needsGrad ? Fingerprint.of(out) : null;
        // The segment keeps its own handles (graph-connected aliases) on its inputs and output leaves: callers close
        // their handles freely (the DeepSeek model closes every intermediate of its forward), the recomputation and
        // the upstream gradient still find theirs.
        NDList leaves = new NDList(out.size());
        NDList returned = new NDList(out.size());
        for (NDArray o : out) {
            NDArray leaf = o.stopGradient();
            NDScope.unregister(leaf);
            leaf.setName(o.getName());
            if (needsGrad && o.getDataType().isFloating()) {
                leaf.setRequiresGradient(true);
            }
            leaves.add(leaf);
            NDArray view = AutogradGraph.alias(leaf);
            view.setName(o.getName());
            returned.add(view);
            st.leaves.put(view, leaf.hasGradient());
            if (!containsSame(inputs, o)) {
                o.close();
            }
        }
        if (!needsGrad) {
            leaves.close();
            return returned;
        }
        NDList kept = new NDList(inputs.size());
        for (NDArray x : inputs) {
            NDArray a = AutogradGraph.alias(x);
            NDScope.unregister(a);
            kept.add(a);
        }
        st.segments.addLast(new Segment(name, blocks, ps, kept, params, leaves, fingerprint, inputHasGraph));
        recorded.incrementAndGet();
        return returned;
    }

    private void backward(ThreadState st, Segment s, boolean retain) {
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
        try {
            if (!any) {
                return; // the segment's output did not reach the loss
            }
            for (NDArray x : s.inputs) {
                if (x.isReleased()) {
                    throw new IllegalStateException(
                            "the input of checkpointed block '" + s.name + "' was freed before backward: its NDManager"
                                    + " was closed; keep the step's manager open until the gradients are computed");
                }
            }
            // checkpointed blocks inside this one record their own segments while it is recomputed (nested
            // checkpointing): they are visited after its backward, while its recomputed graph still exists
            Deque<Segment> enclosing = st.segments;
            Map<NDArray, Boolean> enclosingLeaves = st.leaves;
            Deque<Segment> nested = new ArrayDeque<>();
            st.segments = nested;
            st.leaves = new IdentityHashMap<>();
            st.recomputing++;
            st.visiting++;
            int level = st.visiting; // 1: the outermost checkpointed blocks, 2: blocks nested in them, ...
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
                visit(st, nested, retain);
                scope.suppressNotUsedWarning();
            } finally {
                st.visiting--;
                nested.forEach(Segment::close);
            }
        } finally {
            for (NDArray g : grads) {
                if (g != null) {
                    g.close();
                }
            }
            s.close();
        }
    }

    private static void closeIntermediate(NDList previous, NDList spanInputs, NDList current) {
        for (NDArray a : previous) {
            if (!containsSame(spanInputs, a) && !containsSame(current, a)) {
                a.close();
            }
        }
    }

    private static boolean containsSame(NDList list, NDArray a) {
        for (NDArray x : list) {
            if (x == a) {
                return true;
            }
        }
        return false;
    }

    private static boolean sameArrays(NDList a, NDList b) {
        if (a == null || a.size() != b.size()) {
            return false;
        }
        for (int i = 0; i < a.size(); i++) {
            if (a.get(i) != b.get(i)) {
                return false;
            }
        }
        return true;
    }

    private static final class ThreadState {
        Deque<Segment> segments = new ArrayDeque<>();
        Map<NDArray, Boolean> leaves = new IdentityHashMap<>();
        SpanRun spanRun;
        int recomputing; // depth of segment recomputations in progress
        int visiting; // depth of segment backward visits in progress (nesting level of the current one)
        Map<NDArray, Boolean> computed = new IdentityHashMap<>(); // arrays the caller said carry a graph
    }

    private static final class SpanRun {
        final Span span;
        final NDList inputs;
        NDList last;
        int next = 1;

        SpanRun(Span span, NDList inputs) {
            this.span = span;
            this.inputs = inputs;
        }
    }
}
