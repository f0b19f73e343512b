package ai.djl.memopt.checkpoint;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.nn.Block;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Deque;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Map;

/**
 * The forward half of {@link CheckpointingGradientCollector}: a checkpointed block (or a run of children checkpointed
 * as one segment) runs without autograd, and when something in it needs a gradient its {@link Segment} is recorded on
 * the thread's state: input aliases, parameters, and output leaves that require grad, whose aliases are returned.
 */
final class SegmentRecorder {

    private SegmentRecorder() {}

    /** Runs {@code cb} without autograd and records its segment on {@code st} when it needs a backward. */
    static NDList forward(ThreadState st, CheckpointBlock cb, ParameterStore ps, NDList inputs, PairList<String, Object> params) {
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

    private static NDList finish(
            ThreadState st, String name, List<Block> blocks, boolean verify, ParameterStore ps, NDList inputs,
            PairList<String, Object> params, NDList out) {
        boolean inputGrad = false;
        boolean inputHasGraph = false;
        NDList inputLeaves = new NDList();
        for (NDArray x : inputs) {
            if (!x.getDataType().isFloating()) {
                continue;
            }
            NDArray ours = st.leaves.get(x);
            if (ours != null) { // an earlier segment's output: a view of its leaf, no graph beyond it
                if (ours.hasGradient()) {
                    inputGrad = true;
                    inputLeaves.add(ours);
                }
            } else if (x.hasGradient()) {
                inputGrad = true; // a leaf that requires grad
                inputLeaves.add(x);
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
            st.leaves.put(view, leaf);
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
        st.segments.addLast(
                new Segment(name, blocks, ps, kept, params, leaves, fingerprint, inputHasGraph, inputLeaves));
        return returned;
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

    /** What the collector keeps per thread: the segments recorded and the bookkeeping of the backward in progress. */
    static final class ThreadState {
        Deque<Segment> segments = new ArrayDeque<>();
        Map<NDArray, NDArray> leaves = new IdentityHashMap<>(); // returned view of a segment output -> its leaf
        List<NDArray> registered = new ArrayList<>(); // leaves behind computed arrays (markComputed), for the next backward
        List<NDArray> guarded = List.of(); // those of the backward in progress
        SpanRun spanRun;
        int recomputing; // depth of segment recomputations in progress
        int visiting; // depth of segment backward visits in progress (nesting level of the current one)
        int attempt; // of the outermost segment being back-propagated (nested segments are told it)
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
