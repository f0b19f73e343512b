package ai.djl.memopt.precision;

import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.BlockSite;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.nn.MasterWeights;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.ArrayList;
import java.util.Collections;
import java.util.IdentityHashMap;
import java.util.Set;
import java.util.List;
import java.util.Map;

/**
 * Mixed-precision training for any DJL block: FP16 compute with FP32 master weights (Micikevicius et al. 2018).
 *
 * <p>DJL 0.36 cannot cast a block ({@code Block.cast} throws) and cannot multiply FP32 by FP16, so wrapping does the
 * conversion itself, once: every FP32 parameter outside the FP32 islands gets an FP16 working copy that becomes the
 * parameter's array (what {@code forward} reads and autograd differentiates), and the original FP32 array is kept as
 * the master weight for {@link MixedPrecisionOptimizer}. Sub-blocks the {@link PrecisionPolicy} keeps in FP32 (norms,
 * softmax, the MoE router) are wrapped in an {@link Fp32Block} that casts at their boundary. Floating inputs are cast
 * to FP16 on the way in, floating outputs back to FP32 on the way out (so the loss is FP32); integer inputs (token
 * ids) pass through. Shapes are those of the wrapped block.
 *
 * <pre>{@code
 * block.initialize(manager, DataType.FLOAT32, inputShape);   // FP32 first: these become the masters
 * MixedPrecisionBlock mp = MixedPrecisionBlock.wrap(block);  // before any ParameterStore/Trainer reads parameters
 * MixedPrecisionOptimizer opt = MixedPrecisionOptimizer.builder()
 *         .setBlock(mp).setOptimizer(Optimizer.adam().build()).build();
 * try (GradientCollector gc = engine.newGradientCollector()) {
 *     NDArray loss = lossFn.evaluate(labels, mp.forward(ps, inputs, true));  // FP32
 *     gc.backward(opt.scaleLoss(loss));
 * }
 * opt.step();   // unscale, inf/NaN check, FP32 update, copy back; false if the step was skipped
 * }</pre>
 *
 * <p>A {@link ai.djl.training.ParameterStore} caches parameter arrays on first use: wrap before creating the trainer
 * or store that will run the block. Transparent to {@link BlockTrees} paths: {@code BlockTrees.parameters} names are unchanged.
 */
public final class MixedPrecisionBlock extends AbstractBlock implements BlockDecorator, MasterWeights {

    private static final byte VERSION = 1;

    private final Block block;
    private final PrecisionPolicy policy;
    private volatile List<MasterWeight> masters;
    private final List<String> fp32Paths;

    private MixedPrecisionBlock(Block block, PrecisionPolicy policy) {
        super(VERSION);
        Preconditions.checkArgument(
                !(block instanceof MixedPrecisionBlock), "the block is already a MixedPrecisionBlock");
        Preconditions.checkArgument(
                block.isInitialized(),
                "initialize %s in FP32 before wrapping it in a MixedPrecisionBlock: its FP32 parameters become the"
                        + " master weights", block.getClass().getSimpleName());
        this.block = addChildBlock("mixed_precision", block);
        this.policy = policy;
        this.inputShapes = block.getInputShapes();
        this.fp32Paths = markFp32Islands();
        this.masters = convertParameters();
    }

    /** Wraps with {@link PrecisionPolicy#defaults()}. */
    public static MixedPrecisionBlock wrap(Block block) {
        return wrap(block, PrecisionPolicy.defaults());
    }

    /** Wraps an initialized block; converts its parameters as described in the class documentation. */
    public static MixedPrecisionBlock wrap(Block block, PrecisionPolicy policy) {
        Preconditions.checkNotNull(block, "block");
        Preconditions.checkNotNull(policy, "policy");
        return new MixedPrecisionBlock(block, policy);
    }

    private List<String> markFp32Islands() {
        List<String> islands = new ArrayList<>();
        for (BlockSite site : BlockTrees.sites(block).values()) {
            String path = site.path();
            if (under(path, islands)) {
                continue;
            }
            // decided on what computes there, through checkpointing or LoRA wrappers
            if (site.wrapper(Fp32Block.class).isPresent() || policy.keepFp32(path, site.core())) {
                Preconditions.checkArgument(
                        !path.isEmpty(), "the policy keeps the whole %s in FP32: nothing to run in FP16",
                        block.getClass().getSimpleName());
                islands.add(path);
            }
        }
        for (String path : islands) {
            BlockSite site = BlockTrees.site(block, path);
            if (site.wrapper(Fp32Block.class).isEmpty()) {
                DataType out =
                        policy.islandKeepsFp32Output(path, site.core()) ? DataType.FLOAT32 : policy.computeType();
                site.replaceCore(old -> new Fp32Block(old, out));
            }
        }
        return ImmutableList.copyOf(islands);
    }

    private List<MasterWeight> convertParameters() {
        List<MasterWeight> out = new ArrayList<>();
        Set<Parameter> seen = Collections.newSetFromMap(new IdentityHashMap<>());
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(block).entrySet()) {
            if (seen.add(e.getValue())) { // a parameter shared by two blocks is converted once
                convert(e.getKey(), e.getValue(), out);
            }
        }
        return ImmutableList.copyOf(out);
    }

    /**
     * Converts one parameter as the class documentation says: FP32 in an island, else an FP16 working copy, with an
     * FP32 master (added to {@code masters}) if it is trainable.
     */
    private void convert(String path, Parameter p, List<MasterWeight> masters) {
        NDArray a = p.getArray();
        DataType t = Precisions.checkSupported(a.getDataType());
        if (!t.isFloating()) {
            return;
        }
        if (under(path, fp32Paths)) {
            if (t != DataType.FLOAT32) { // e.g. a model loaded in FP16: its islands must compute in FP32
                replaceArray(p, a, a.toType(DataType.FLOAT32, true));
                a.close();
            }
            return;
        }
        if (!p.requiresGradient()) {
            // frozen (a LoRA base, say): never updated, so it needs no FP32 master, only its working copy
            if (t != policy.computeType()) {
                replaceArray(p, a, a.toType(policy.computeType(), true));
                a.close();
            }
            return;
        }
        NDArray master = t == DataType.FLOAT32 ? a : a.toType(DataType.FLOAT32, true);
        NDArray working = t == policy.computeType() ? a : a.toType(policy.computeType(), true);
        if (working != a) {
            replaceArray(p, a, working);
        }
        if (master != a) {
            master.attach(a.getManager());
        }
        master.setName(a.getName());
        if (master.hasGradient()) {
            master.setRequiresGradient(false); // updated by the optimizer only, never differentiated
        }
        masters.add(new MasterWeight(path, p, master));
    }

    /**
     * Follows a change below (a layer quantized or adapted through {@link BlockTrees}, after this block was made): the
     * masters of parameters that left the tree or were frozen are freed, and new parameters are converted as at
     * wrapping (a new trainable adapter gets its FP16 working copy and FP32 master). The result is the model that
     * wrapping after the change would have given.
     */
    @Override
    public synchronized void blocksReplaced() {
        Map<Parameter, MasterWeight> current = new IdentityHashMap<>();
        masters.forEach(w -> current.put(w.parameter(), w));
        List<MasterWeight> kept = new ArrayList<>();
        Set<Parameter> seen = Collections.newSetFromMap(new IdentityHashMap<>());
        for (Map.Entry<String, Parameter> e : BlockTrees.parameters(block).entrySet()) {
            Parameter p = e.getValue();
            if (!seen.add(p) || !p.isInitialized()) {
                continue;
            }
            MasterWeight w = current.remove(p);
            if (w != null && p.requiresGradient()) {
                kept.add(w);
            } else {
                if (w != null && p.getArray() != w.master()) {
                    w.master().close(); // frozen since: the FP16 working copy is all it needs
                }
                convert(e.getKey(), p, kept);
            }
        }
        for (MasterWeight gone : current.values()) {
            // the parameter left the tree (its layer was quantized or merged)
            if (!(gone.parameter().isInitialized() && gone.parameter().getArray() == gone.master())) {
                gone.master().close();
            }
        }
        masters = ImmutableList.copyOf(kept);
    }

    /** {@inheritDoc} */
    @Override
    public NDArray masterOf(Parameter parameter) {
        for (MasterWeight w : masters) {
            if (w.parameter() == parameter) {
                return w.master();
            }
        }
        return null;
    }

    /** Copies the master into the FP16 working copy, in place (the working array keeps its identity). */
    @Override
    public void masterChanged(Parameter parameter) {
        NDArray master = Preconditions.checkNotNull(masterOf(parameter), "no master weight for %s", parameter);
        copyInto(master, parameter.getArray());
    }

    /**
     * Writes {@code master} into {@code working} in place, in the working copy's type and on its device (a master may
     * live on the host: optimizer offload), with autograd off for the write into a leaf that requires grad.
     */
    public static void copyInto(NDArray master, NDArray working) {
        try (NDArray cast = master.toType(working.getDataType(), true);
                NDArray copy = cast.toDevice(working.getDevice(), false)) {
            boolean gradMode = JniUtils.isGradMode();
            JniUtils.setGradMode(false);
            try {
                working.set(new NDIndex("..."), copy);
            } finally {
                JniUtils.setGradMode(gradMode);
            }
        }
    }

    private static void replaceArray(Parameter p, NDArray old, NDArray replacement) {
        replacement.attach(old.getManager());
        replacement.setName(old.getName());
        if (p.requiresGradient()) {
            replacement.setRequiresGradient(true);
        }
        ParameterArrays.swap(p, replacement);
    }

    private static boolean under(String path, List<String> prefixes) {
        for (String p : prefixes) {
            if (path.equals(p) || path.startsWith(p + ".") || p.isEmpty()) {
                return true;
            }
        }
        return false;
    }

    /** {@inheritDoc} */
    @Override
    public Block delegate() {
        return block;
    }

    /** The policy this block was converted with. */
    public PrecisionPolicy getPolicy() {
        return policy;
    }

    /**
     * Moves the FP32 masters to {@code device} (optimizer offload: the host), freeing the old arrays; the working copies
     * stay where they are. Masters already there are kept as they are.
     *
     * @return the masters after the move
     */
    public List<MasterWeight> moveMasters(ai.djl.Device device) {
        List<MasterWeight> moved = new ArrayList<>();
        for (MasterWeight w : masters) {
            NDArray m = w.master();
            if (m.getDevice().equals(device)) {
                moved.add(w);
                continue;
            }
            NDArray there = m.toDevice(device, true);
            there.attach(m.getManager());
            there.setName(m.getName());
            m.close();
            moved.add(new MasterWeight(w.path(), w.parameter(), there));
        }
        masters = ImmutableList.copyOf(moved);
        return masters;
    }

    /** The FP16 parameters with their FP32 masters, paths relative to the wrapped block. */
    public List<MasterWeight> masterWeights() {
        return masters;
    }

    /**
     * Runs {@code action} with every converted parameter showing its FP32 master instead of its FP16 working copy,
     * then switches back (also on failure): for saving a checkpoint of the trained FP32 weights.
     *
     * <pre>{@code
     * mp.withMasterWeights(() -> { DeepSeekCheckpointWriter.save(lm, lm.config(), out); return null; });
     * }</pre>
     */
    public <T> T withMasterWeights(java.util.concurrent.Callable<T> action) throws Exception {
        List<NDArray> working = new ArrayList<>(masters.size());
        for (MasterWeight w : masters) {
            working.add(w.parameter().getArray());
        }
        try {
            for (MasterWeight w : masters) {
                ParameterArrays.swap(w.parameter(), w.master());
            }
            return action.call();
        } finally {
            for (int i = 0; i < masters.size(); i++) {
                ParameterArrays.swap(masters.get(i).parameter(), working.get(i));
            }
        }
    }

    /** The paths (relative to the wrapped block) of the sub-blocks that run in FP32. */
    public List<String> fp32Paths() {
        return fp32Paths;
    }

    /** {@inheritDoc} */
    @Override
    protected NDList forwardInternal(
            ParameterStore parameterStore, NDList inputs, boolean training, PairList<String, Object> params) {
        return Casts.forward(block, parameterStore, inputs, training, params, policy.computeType(),
                policy.fp32Outputs() ? DataType.FLOAT32 : null);
    }

    /** {@inheritDoc} */
    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return block.getOutputShapes(inputShapes);
    }

    /** {@inheritDoc} */
    @Override
    public boolean isInitialized() {
        return block.isInitialized();
    }

    /** {@inheritDoc} */
    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        block.initialize(manager, dataType, inputShapes);
    }

    /** An FP16 working parameter and its FP32 master. */
    public static final class MasterWeight {
        private final String path;
        private final Parameter parameter;
        private final NDArray master;

        MasterWeight(String path, Parameter parameter, NDArray master) {
            this.path = path;
            this.parameter = parameter;
            this.master = master;
        }

        /** Path relative to the wrapped block ({@code layers.0.mlp.gate_proj.weight}). */
        public String path() {
            return path;
        }

        /** The DJL parameter; its array is the FP16 working copy. */
        public Parameter parameter() {
            return parameter;
        }

        /** The FP32 master array. */
        public NDArray master() {
            return master;
        }
    }
}
