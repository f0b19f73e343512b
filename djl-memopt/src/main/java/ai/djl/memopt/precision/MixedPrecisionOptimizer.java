package ai.djl.memopt.precision;

import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.optimizer.Optimizer;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.ArrayList;
import java.util.Collections;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * The optimizer side of mixed precision: wraps a DJL {@link Optimizer} (Adam, AdamW, SGD...) and, per step, unscales
 * the FP16 gradients into FP32, checks them for inf/NaN, updates the FP32 master weights, copies them back into the
 * FP16 working weights and zeroes the gradients. An overflow skips the whole step (no parameter changes) and lowers
 * the loss scale. FP32 parameters of the model (norms, router: the FP32 islands) are their own masters.
 *
 * <p>Use {@link #step()} instead of {@code trainer.step()}: DJL's parameter server updates parameter by parameter and
 * cannot skip a step after some parameters were already updated. See {@link MixedPrecisionBlock} for the loop.
 */
public final class MixedPrecisionOptimizer {

    private final Optimizer optimizer;
    private final DynamicLossScaler scaler;
    private final List<Entry> entries;

    private MixedPrecisionOptimizer(Builder b) {
        this.optimizer = b.optimizer;
        this.scaler = b.scaler != null ? b.scaler : DynamicLossScaler.create();
        Map<Parameter, NDArray> masters = new IdentityHashMap<>();
        for (Block block : BlockTrees.walk(b.block).values()) {
            for (Block level = block; ; level = ((BlockDecorator) level).delegate()) {
                if (level instanceof MixedPrecisionBlock) {
                    for (MixedPrecisionBlock.MasterWeight w : ((MixedPrecisionBlock) level).masterWeights()) {
                        masters.put(w.parameter(), w.master());
                    }
                }
                if (!(level instanceof BlockDecorator)) {
                    break;
                }
            }
        }
        ImmutableList.Builder<Entry> list = ImmutableList.builder();
        Set<Parameter> seen = Collections.newSetFromMap(new IdentityHashMap<>());
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(b.block).entrySet()) {
            Parameter p = e.getValue();
            if (!p.requiresGradient() || !seen.add(p)) {
                continue;
            }
            NDArray master = masters.get(p);
            DataType t = Precisions.checkSupported(p.getArray().getDataType());
            Preconditions.checkArgument(
                    master != null || t == DataType.FLOAT32,
                    "parameter %s is %s but has no FP32 master: wrap its block in a MixedPrecisionBlock", e.getKey(),
                    t);
            list.add(new Entry(e.getKey(), p, master));
        }
        this.entries = list.build();
        Preconditions.checkArgument(!entries.isEmpty(), "the block has no trainable parameters");
    }

    public static Builder builder() {
        return new Builder();
    }

    /** The loss scaler. */
    public DynamicLossScaler getLossScaler() {
        return scaler;
    }

    /** {@code loss * scale}: call backward on this. */
    public NDArray scaleLoss(NDArray loss) {
        return scaler.scale(loss);
    }

    /**
     * Applies one optimizer step from the accumulated (scaled) gradients, or skips it on inf/NaN.
     *
     * @return true if the parameters were updated, false if the step was skipped (the scale was lowered)
     */
    public boolean step() {
        float scale = scaler.getScale();
        NDArray[] grads = new NDArray[entries.size()];
        try {
            boolean overflow;
            // every temporary of the unscale-and-check pass is closed by the scope; only the FP32 gradients survive
            try (NDScope scope = new NDScope()) {
                scope.suppressNotUsedWarning();
                NDList bad = new NDList(entries.size());
                for (int i = 0; i < entries.size(); i++) {
                    NDArray w = entries.get(i).parameter.getArray();
                    NDArray g = w.getGradient();
                    // unscale in FP32: the scaled FP16 value may not be representable unscaled
                    NDArray g32 = g.toType(DataType.FLOAT32, true).divi(scale);
                    NDScope.unregister(g32);
                    grads[i] = g32;
                    bad.add(g32.isInfinite().logicalOr(g32.isNaN()).toType(DataType.INT64, false).sum());
                }
                overflow = NDArrays.stack(bad).sum().getLong() > 0; // one device sync per step
            }
            if (!scaler.update(overflow)) {
                zeroGradients();
                return false;
            }
            for (int i = 0; i < entries.size(); i++) {
                Entry e = entries.get(i);
                NDArray w = e.parameter.getArray();
                if (e.master == null) {
                    optimizer.update(e.parameter.getId(), w, grads[i]);
                    zeroGradient(w);
                } else {
                    optimizer.update(e.parameter.getId(), e.master, grads[i]);
                    try (NDArray copy = e.master.toType(w.getDataType(), true)) {
                        boolean gradMode = JniUtils.isGradMode();
                        JniUtils.setGradMode(false); // in-place write into a leaf that requires grad
                        try {
                            w.set(new NDIndex("..."), copy);
                        } finally {
                            JniUtils.setGradMode(gradMode);
                        }
                    }
                    zeroGradient(w);
                }
            }
            return true;
        } finally {
            for (NDArray g : grads) {
                if (g != null) {
                    g.close();
                }
            }
        }
    }

    /** Zeroes the gradients of every trainable parameter. */
    public void zeroGradients() {
        for (Entry e : entries) {
            zeroGradient(e.parameter.getArray());
        }
    }

    private static void zeroGradient(NDArray w) {
        if (w instanceof PtNDArray) {
            JniUtils.zeroGrad((PtNDArray) w);
        } else {
            try (NDArray g = w.getGradient()) {
                g.subi(g);
            }
        }
    }

    /** The trainable parameters this optimizer updates, by path. */
    public List<String> parameterPaths() {
        List<String> out = new ArrayList<>();
        for (Entry e : entries) {
            out.add(e.path);
        }
        return Collections.unmodifiableList(out);
    }

    private static final class Entry {
        final String path;
        final Parameter parameter;
        final NDArray master;

        Entry(String path, Parameter parameter, NDArray master) {
            this.path = path;
            this.parameter = parameter;
            this.master = master;
        }
    }

    /** Builder: {@code setBlock} and {@code setOptimizer} required. */
    public static final class Builder {
        private Block block;
        private Optimizer optimizer;
        private DynamicLossScaler scaler;

        private Builder() {}

        /** The model (or any block containing the {@link MixedPrecisionBlock}s) whose parameters are trained. */
        public Builder setBlock(Block block) {
            this.block = block;
            return this;
        }

        /** The DJL optimizer that updates the FP32 masters. */
        public Builder setOptimizer(Optimizer optimizer) {
            this.optimizer = optimizer;
            return this;
        }

        /** The loss scaler (default {@link DynamicLossScaler#create()}). */
        public Builder optLossScaler(DynamicLossScaler scaler) {
            this.scaler = scaler;
            return this;
        }

        public MixedPrecisionOptimizer build() {
            Preconditions.checkArgument(block != null, "MixedPrecisionOptimizer needs a block: call setBlock");
            Preconditions.checkArgument(optimizer != null, "MixedPrecisionOptimizer needs an optimizer: call setOptimizer");
            return new MixedPrecisionOptimizer(this);
        }
    }
}
