package ai.djl.memopt.nn;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;
import java.util.ArrayDeque;
import java.util.Collections;
import java.util.Deque;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * Per-phase device time of the code running on one thread (a training step's forward, loss head, recomputations,
 * backward, optimizer update, host reads), for {@code memopt bench train --profile}. Off unless {@link #start} was
 * called on the thread: then {@link #phase} returns a shared no-op and costs one thread-local read.
 *
 * <p>On a GPU the work is queued asynchronously, so a host clock alone would charge a phase with whatever the device
 * still had to do from the phase before. While a timer runs, every phase boundary first waits for the device (a
 * one-element device-to-host copy, which waits for all queued work), so each phase's time is the device time of its
 * own work plus the host time of queueing it. These waits change the timing of the code they measure (the device
 * idles while the host queues the next phase's first operations): compare the profile's total with the unprofiled step.
 * Time is exclusive: a nested phase's time is not counted in its parent's.
 *
 * <pre>{@code
 * PhaseTimer timer = PhaseTimer.start(manager);           // on this thread, until stop()
 * try (PhaseTimer.Phase p = PhaseTimer.phase("forward")) {
 *     hidden = model.forward(...);
 * }
 * Map<String, Double> seconds = timer.stop();             // {forward=0.012, ...}
 * }</pre>
 */
public final class PhaseTimer {

    private static final ThreadLocal<PhaseTimer> ACTIVE = new ThreadLocal<>();
    /** What {@link #phase} returns when no timer runs on the thread. */
    private static final Phase NOOP = () -> {};
    /** Time outside every phase while the timer runs. */
    public static final String OTHER = "other";

    private final NDManager manager;
    private final boolean gpu;
    private final Map<String, long[]> totals = new LinkedHashMap<>(); // name -> {nanos, entries}
    private final Deque<String> stack = new ArrayDeque<>();
    private final Phase closer = this::pop;
    private long mark;

    private PhaseTimer(NDManager manager) {
        this.manager = manager;
        this.gpu = manager.getDevice().isGpu();
    }

    /**
     * Starts timing the phases of this thread on the device of {@code manager} (which makes the one-element arrays
     * used to wait for the device; they are closed at once).
     *
     * @throws IllegalStateException if a timer already runs on this thread
     */
    public static PhaseTimer start(NDManager manager) {
        Preconditions.checkState(ACTIVE.get() == null, "a PhaseTimer already runs on this thread");
        PhaseTimer t = new PhaseTimer(manager);
        t.sync();
        t.mark = System.nanoTime();
        ACTIVE.set(t);
        return t;
    }

    /** Whether a timer runs on this thread. */
    public static boolean isActive() {
        return ACTIVE.get() != null;
    }

    /** Enters phase {@code name} until the returned handle is closed (a no-op when no timer runs on this thread). */
    public static Phase phase(String name) {
        PhaseTimer t = ACTIVE.get();
        if (t == null) {
            return NOOP;
        }
        t.push(name);
        return t.closer;
    }

    /** Stops timing on this thread; returns the seconds and entries of each phase, in first-entered order. */
    public Map<String, Double> stop() {
        Preconditions.checkState(ACTIVE.get() == this, "this PhaseTimer does not run on the calling thread");
        Preconditions.checkState(stack.isEmpty(), "phases still open: %s", stack);
        charge(OTHER);
        ACTIVE.remove();
        Map<String, Double> out = new LinkedHashMap<>();
        for (Map.Entry<String, long[]> e : totals.entrySet()) {
            out.put(e.getKey(), e.getValue()[0] / 1e9);
        }
        return Collections.unmodifiableMap(out);
    }

    /** How many times each phase was entered so far, in first-entered order. */
    public Map<String, Long> entries() {
        Map<String, Long> out = new LinkedHashMap<>();
        for (Map.Entry<String, long[]> e : totals.entrySet()) {
            out.put(e.getKey(), e.getValue()[1]);
        }
        return Collections.unmodifiableMap(out);
    }

    private void push(String name) {
        charge(stack.isEmpty() ? OTHER : stack.peek());
        stack.push(name);
        totals.computeIfAbsent(name, k -> new long[2])[1]++;
    }

    private void pop() {
        Preconditions.checkState(!stack.isEmpty(), "PhaseTimer: a phase closed twice");
        charge(stack.pop());
    }

    /** Waits for the device, then adds the time since the last boundary to {@code name}. */
    private void charge(String name) {
        sync();
        long now = System.nanoTime();
        totals.computeIfAbsent(name, k -> new long[2])[0] += now - mark;
        mark = now;
    }

    /** Waits until the device has run everything queued so far (nothing to wait for on a CPU). */
    private void sync() {
        if (!gpu) {
            return;
        }
        try (NDArray one = manager.zeros(new Shape(1), DataType.FLOAT32)) {
            one.toFloatArray(); // a device-to-host copy waits for the work queued before it
        }
    }

    /** An open phase; closing it returns to the enclosing one. */
    @FunctionalInterface
    public interface Phase extends AutoCloseable {
        @Override
        void close();
    }
}
