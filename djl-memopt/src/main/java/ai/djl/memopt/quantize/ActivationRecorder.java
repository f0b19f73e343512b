package ai.djl.memopt.quantize;

import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * Temporary decorator that records the inputs of a Linear during calibration: the per-channel sum of {@code |x|}
 * over every row and the first {@code maxRows} rows (FP32), then calls the Linear unchanged.
 */
final class ActivationRecorder extends AbstractBlock {

    private final Block inner;
    private final long in;
    private final int maxRows;
    private final NDManager manager;
    private NDArray sumAbs; // (in)
    private NDArray rows; // (n, in)
    private NDArray xtx; // (in, in), GPTQ only
    private final boolean hessian;
    private long count;

    /**
     * @param hessian accumulate {@code X^T X} over every row (GPTQ) instead of keeping rows (AWQ)
     */
    ActivationRecorder(Block inner, long in, int maxRows, boolean hessian, NDManager parent) {
        super((byte) 1);
        this.inner = inner;
        this.in = in;
        this.maxRows = hessian ? 0 : maxRows;
        this.hessian = hessian;
        this.manager = parent.newSubManager();
    }

    /** Bytes this recorder holds at most: kept rows and statistics, or the Hessian. */
    static long bytesNeeded(long in, int maxRows, boolean hessian) {
        return hessian ? (in * in + in) * 4 : (maxRows + 1L) * in * 4;
    }

    Block inner() {
        return inner;
    }

    @Override
    protected NDList forwardInternal(ParameterStore parameterStore, NDList inputs, boolean training,
            PairList<String, Object> params) {
        NDArray x = inputs.head(); // (..., in)
        try (NDManager tmp = manager.newSubManager()) {
            NDArray flat = Temps.copy(x, tmp, DataType.FLOAT32).reshape(-1, in); // (n, in)
            NDArray abs = flat.abs().sum(new int[] {0}); // (in)
            NDArray old = sumAbs;
            sumAbs = old == null ? abs : old.add(abs);
            sumAbs.attach(manager);
            // the model's forward may run inside an NDScope that closes every array created in it
            NDScope.unregister(sumAbs);
            if (old != null) {
                old.close();
            }
            count += flat.getShape().get(0);
            if (hessian) {
                NDArray oldH = xtx;
                NDArray part = flat.transpose().matMul(flat); // (in, in)
                xtx = oldH == null ? part : oldH.add(part);
                xtx.attach(manager);
                NDScope.unregister(xtx);
                if (oldH != null) {
                    oldH.close();
                }
            }
            long have = rows == null ? 0 : rows.getShape().get(0);
            if (have < maxRows) {
                long take = Math.min(maxRows - have, flat.getShape().get(0));
                NDArray part = flat.get("0:" + take);
                NDArray oldRows = rows;
                rows = oldRows == null ? part : NDArrays.concat(new NDList(oldRows, part), 0);
                rows.attach(manager);
                NDScope.unregister(rows);
                if (oldRows != null) {
                    oldRows.close();
                }
            }
        }
        return inner.forward(parameterStore, inputs, training, params);
    }

    /** Whether any calibration row reached the layer (a routed expert may receive none). */
    boolean hasActivations() {
        return count > 0;
    }

    /** Mean {@code |x|} per input channel (in), attached to the recorder's manager. */
    NDArray meanAbs() {
        if (sumAbs == null) {
            throw new IllegalStateException("no calibration activation reached this layer");
        }
        return sumAbs.div((float) count);
    }

    /** Sum of {@code x^T x} over every row (in, in), GPTQ recorders only. */
    NDArray xtx() {
        return xtx;
    }

    /** Rows seen. */
    long count() {
        return count;
    }

    /** The recorded rows (n, in). */
    NDArray rows() {
        return rows;
    }

    /** Frees the recordings. */
    void close() {
        manager.close();
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return inner.getOutputShapes(inputShapes);
    }

    /**
     * Runs the calibration batches through {@code root} with a recorder on each layer whose method needs activations
     * (AWQ, GPTQ), put inside any decorators there and taken out again, also on failure.
     *
     * @return the recorders by layer path (the caller closes them)
     */
    static Map<String, ActivationRecorder> record(Block root, Map<String, QuantMethod> methods,
            Calibration calibration) {
        Map<String, ActivationRecorder> recorders = new LinkedHashMap<>();
        try {
            for (Map.Entry<String, QuantMethod> t : methods.entrySet()) {
                QuantMethod method = t.getValue();
                if (method == QuantMethod.RTN) {
                    continue;
                }
                NDArray w = BlockTrees.site(root, t.getKey()).core().getParameters().get("weight").getArray();
                BlockTrees.replace(root, t.getKey(), linear -> {
                    ActivationRecorder r = new ActivationRecorder(linear, w.getShape().get(1),
                            calibration.maxRowsPerLayer(), method == QuantMethod.GPTQ, w.getManager());
                    recorders.put(t.getKey(), r);
                    return r;
                });
            }
            for (NDList batch : calibration.batches()) {
                NDManager manager = batch.head().getManager();
                // NDScope frees every intermediate of the forward (a generic block leaves them in the input's manager);
                // the recorders unregister what they keep
                try (NDManager scope = manager.newSubManager(); NDScope arrays = new NDScope()) {
                    arrays.suppressNotUsedWarning();
                    NDList out = root.forward(new ParameterStore(scope, false), batch, false);
                    out.attach(scope);
                }
            }
        } catch (RuntimeException e) {
            recorders.values().forEach(ActivationRecorder::close);
            throw e;
        } finally {
            for (Map.Entry<String, ActivationRecorder> r : recorders.entrySet()) {
                BlockTrees.replace(root, r.getKey(), rec -> ((ActivationRecorder) rec).inner());
            }
        }
        return recorders;
    }
}
