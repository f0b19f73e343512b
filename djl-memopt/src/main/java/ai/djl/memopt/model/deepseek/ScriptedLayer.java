package ai.djl.memopt.model.deepseek;

import ai.djl.Device;
import ai.djl.memopt.nn.DeviceDefaultSwitch;
import ai.djl.memopt.nn.FusedAttention;
import ai.djl.memopt.nn.HostReads;
import ai.djl.memopt.nn.PrecisionIsland;
import ai.djl.memopt.nn.TorchScriptModules;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.engine.PtSymbolBlock;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.ParameterStore;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.LongAdder;

/**
 * A {@link DeepSeekDecoderLayer}'s full-sequence forward (training and prefill) as one TorchScript call: libtorch
 * dispatches the layer's few hundred operations in C++ instead of one Java and JNI round trip each, which is what bounds
 * a training step on a GPU. The source is generated from the config and the layer's FP32 islands
 * ({@link ScriptedLayerSource}), written as a TorchScript archive and compiled by libtorch once per process and source.
 *
 * <p>Autograd: the module is called in training mode (no inference guard), so with the thread's grad mode on every
 * operation records autograd as the Java path's do, and the parameters' own arrays (read through the
 * {@link ParameterStore} as the Java blocks read them, passed as {@code List[Tensor]}) receive their gradients. The
 * graph executor's optimisation is off during the call unless {@code -Dai.djl.pytorch.graph_optimizer} says otherwise
 * (then set for the thread, as DJL sets it for its own TorchScript blocks), and back to libtorch's default after it.
 *
 * <p>Shapes: {@code x (B, T, hidden)}, {@code cos}, {@code sin} from {@link RotaryEmbedding#cosSin}, optionally the
 * additive FP32 mask {@code (B|1, 1, T, T)}; result {@code (B, T, hidden)} in {@code x}'s type.
 *
 * <p>{@value #PROPERTY} = {@code on}, {@code off}, or unset (on for a layer on a GPU). A layer qualifies when its
 * children are the model's own blocks with plain bias-free {@code Linear} projections, or norms and router inside a
 * {@link PrecisionIsland} (mixed precision's {@code Fp32Block}); anything else inside the layer (LoRA, quantized or
 * checkpointed children) takes the Java path, and {@link #unsupportedReason} says why. Decorators around the layer
 * (layer-level checkpointing) just call its forward.
 *
 * <pre>{@code
 * System.setProperty(ScriptedLayer.PROPERTY, "on");
 * String why = ScriptedLayer.unsupportedReason(layer); // null: its forward runs as one TorchScript call
 * NDArray y = layer.forward(ps, new NDList(x, cos, sin), true).head(); // (B, T, hidden), autograd recorded
 * }</pre>
 */
public final class ScriptedLayer {

    /** System property: {@code on}, {@code off}, or unset for on where the layer's input is on a GPU. */
    public static final String PROPERTY = "ai.djl.memopt.layer.script";

    private static final String GRAPH_OPTIMIZER = "ai.djl.pytorch.graph_optimizer";
    /** Scripted forwards run so far (tests and probes tell the two paths apart with it). */
    private static final LongAdder CALLS = new LongAdder();

    private ScriptedLayer() {}

    /**
     * Whether the property asks for the scripted forward on {@code device} (the layer must still qualify).
     *
     * @throws IllegalArgumentException if {@value #PROPERTY} is neither on nor off
     */
    public static boolean enabled(Device device) {
        return DeviceDefaultSwitch.enabled(PROPERTY, "on", "off", device);
    }

    /** How many layer forwards ran as one TorchScript call in this process so far. */
    public static long calls() {
        return CALLS.sum();
    }

    /** Why {@code layer} cannot run as one TorchScript call, or null if it can; names the first block that is not plain. */
    public static String unsupportedReason(DeepSeekDecoderLayer layer) {
        Object plan = plan(layer);
        return plan instanceof String ? (String) plan : null;
    }

    /**
     * The layer's forward as one call, or null when the Java path must run it (property off, layer not plain, or an
     * inference forward that the MoE would send to its gathered dispatch).
     */
    static NDList forward(DeepSeekDecoderLayer layer, ParameterStore ps, NDList inputs, boolean training) {
        NDArray x = inputs.get(0);
        if (!enabled(x.getDevice()) || !(x instanceof PtNDArray) || TrainingCalls.UNAVAILABLE != null) {
            return null;
        }
        Object plan = plan(layer);
        if (plan instanceof String) {
            return null;
        }
        Plan p = (Plan) plan;
        Device device = x.getDevice();
        long b = x.getShape().get(0);
        long t = x.getShape().get(1);
        if (p.moe != null && !training && p.moe.isGatheredDispatchEnabled()
                && b * t * layer.config().numExpertsPerTok() <= p.moe.gatheredDispatchLimit(device)) {
            return null; // the Java path's gathered dispatch (inference only, no host read)
        }
        NDArray mask = inputs.size() > 3 ? inputs.get(3) : null;
        List<PtNDArray> w = new ArrayList<>(p.weights.size());
        for (Parameter param : p.weights) {
            w.add((PtNDArray) ps.getValue(param, device, training));
        }
        List<List<PtNDArray>> experts = new ArrayList<>();
        for (List<Parameter> projection : p.experts) {
            List<PtNDArray> arrays = new ArrayList<>(projection.size());
            for (Parameter param : projection) {
                arrays.add((PtNDArray) ps.getValue(param, device, training));
            }
            experts.add(arrays);
        }
        boolean fused = mask == null && FusedAttention.enabled(device);
        long group = MultiHeadLatentAttention.headGroup(layer.config().numAttentionHeads(), b, t, t, device);
        DataType moeInput = p.layout.postNorm() == ScriptedLayerSource.PLAIN ? x.getDataType()
                : p.layout.postNorm() == ScriptedLayerSource.FP16 ? DataType.FLOAT16 : DataType.FLOAT32;
        long bucket = moeInput == DataType.FLOAT16 && !device.isGpu() ? 32 : 1; // as DeepSeekMoE.dispatch pads
        if (p.moe != null) {
            HostReads.recordNative(1); // the sorted dispatch reads its expert counts once, inside the script
        }
        CALLS.increment();
        // the graph optimiser: as -Dai.djl.pytorch.graph_optimizer says when set (as DJL's own TorchScript blocks do);
        // else off for this call only, so that the Java path's operators run exactly (with it on, an FP16 gradient
        // moved by 0.7%), and libtorch's default, on, back for a decode step that may run next on this thread (72.4
        // against 57.9 tok/s without it on an H100)
        String optimizer = System.getProperty(GRAPH_OPTIMIZER);
        JniUtils.setGraphExecutorOptimize(optimizer != null && Boolean.parseBoolean(optimizer));
        try {
            return new NDList(TrainingCalls.run(p.module, (PtNDArray) x, (PtNDArray) inputs.get(1),
                    (PtNDArray) inputs.get(2), (PtNDArray) mask, w, experts, fused, group, bucket));
        } finally {
            if (optimizer == null) {
                JniUtils.setGraphExecutorOptimize(true);
            }
        }
    }

    /** A layer's layout and the module compiled for it (kept by the layer). */
    record Compiled(ScriptedLayerSource.Layout layout, PtSymbolBlock module) {}

    /** A qualifying layer's module and the parameters it takes, in the script's order. */
    private static final class Plan {
        final ScriptedLayerSource.Layout layout;
        final PtSymbolBlock module;
        final List<Parameter> weights;
        final List<List<Parameter>> experts; // gate, up, down: one parameter per routed expert
        final DeepSeekMoE moe;

        Plan(ScriptedLayerSource.Layout layout, PtSymbolBlock module, List<Parameter> weights,
                List<List<Parameter>> experts, DeepSeekMoE moe) {
            this.layout = layout;
            this.module = module;
            this.weights = weights;
            this.experts = experts;
            this.moe = moe;
        }
    }

    /**
     * The plan of the layer as it is now, or the reason it has none. Recomputed at each forward (a walk over the
     * layer's blocks, no native call) so that a block replaced since (LoRA, quantization) is seen.
     */
    private static Object plan(DeepSeekDecoderLayer layer) {
        if (TrainingCalls.UNAVAILABLE != null) {
            return TrainingCalls.UNAVAILABLE;
        }
        DeepSeekConfig config = layer.config();
        String at = "model.layers." + layer.index() + ".";
        List<Parameter> w = new ArrayList<>();
        Walk walk = new Walk(config, w);
        int inputNorm = walk.norm(layer.inputLayernorm(), at + "input_layernorm");
        if (!(layer.selfAttn() instanceof MultiHeadLatentAttention)) {
            return at + "self_attn is a " + layer.selfAttn().getClass().getName() + ", not MultiHeadLatentAttention";
        }
        MultiHeadLatentAttention a = (MultiHeadLatentAttention) layer.selfAttn();
        int qANorm = ScriptedLayerSource.PLAIN;
        if (a.hasQLora()) {
            walk.linear(a.qAProj(), at + "self_attn.q_a_proj");
            qANorm = walk.norm(a.qALayernorm(), at + "self_attn.q_a_layernorm");
            walk.linear(a.qBProj(), at + "self_attn.q_b_proj");
        } else {
            walk.linear(a.qProj(), at + "self_attn.q_proj");
        }
        walk.linear(a.kvAProjWithMqa(), at + "self_attn.kv_a_proj_with_mqa");
        int kvANorm = walk.norm(a.kvALayernorm(), at + "self_attn.kv_a_layernorm");
        walk.linear(a.kvBProj(), at + "self_attn.kv_b_proj");
        walk.linear(a.oProj(), at + "self_attn.o_proj");
        if (walk.why == null && a.softmaxScale() != (float) config.softmaxScale()) {
            walk.why = at + "self_attn's softmax scale " + a.softmaxScale() + " is not the config's";
        }
        int postNorm = walk.norm(layer.postAttentionLayernorm(), at + "post_attention_layernorm");
        int gate = ScriptedLayerSource.PLAIN;
        List<List<Parameter>> experts = new ArrayList<>();
        DeepSeekMoE moe = null;
        if (layer.mlp() instanceof DeepSeekMoE) {
            moe = (DeepSeekMoE) layer.mlp();
            gate = walk.gate(moe.gate(), at + "mlp.gate");
            if (walk.why == null && (config.nSharedExperts() > 0) != (moe.sharedExperts() != null)) {
                walk.why = at + "mlp.shared_experts does not match n_shared_experts";
            }
            if (moe.sharedExperts() != null) {
                walk.swiglu(moe.sharedExperts(), at + "mlp.shared_experts");
            }
            if (walk.why == null && moe.experts().size() != config.nRoutedExperts()) {
                walk.why = at + "mlp has " + moe.experts().size() + " experts, the config " + config.nRoutedExperts();
            }
            List<Parameter> all = new ArrayList<>();
            Walk expertWalk = new Walk(config, all);
            for (int e = 0; walk.why == null && e < moe.experts().size(); e++) {
                expertWalk.swiglu(moe.experts().get(e), at + "mlp.experts." + e);
                walk.why = expertWalk.why;
            }
            for (int proj = 0; proj < 3; proj++) {
                List<Parameter> one = new ArrayList<>();
                for (int i = proj; i < all.size(); i += 3) {
                    one.add(all.get(i));
                }
                experts.add(one);
            }
        } else {
            walk.swiglu(layer.mlp(), at + "mlp");
        }
        if (walk.why != null) {
            return walk.why;
        }
        ScriptedLayerSource.Layout layout =
                new ScriptedLayerSource.Layout(moe != null, inputNorm, qANorm, kvANorm, postNorm, gate);
        Compiled compiled = layer.script;
        if (compiled == null || !compiled.layout().equals(layout)) {
            // generated and looked up only when the layer's layout changes, not at every forward
            compiled = new Compiled(layout,
                    TorchScriptModules.load(ScriptedLayerSource.CLASS, ScriptedLayerSource.classBody(config, layout)));
            layer.script = compiled;
        }
        return new Plan(layout, compiled.module(), w, experts, moe);
    }

    /** The checks of {@link #plan}: collects the parameters in order, or the first reason the layer is not plain. */
    private static final class Walk {
        private final DeepSeekConfig config;
        private final List<Parameter> out;
        String why;

        Walk(DeepSeekConfig config, List<Parameter> out) {
            this.config = config;
            this.out = out;
        }

        void linear(Block b, String name) {
            if (why != null) {
                return;
            }
            if (b == null || b.getClass() != Linear.class) {
                why = name + " is a " + (b == null ? "missing block" : b.getClass().getName()) + ", not a plain Linear";
            } else if (b.getParameters().size() != 1) {
                why = name + " has a bias";
            } else {
                out.add(b.getParameters().get("weight"));
            }
        }

        /** An island's outer dtype code, or PLAIN; the block inside must be {@code expected}. */
        private int island(Block b, Class<?> expected, String name) {
            Block core = core(b);
            if (core == null || core.getClass() != expected) {
                why = name + " is a " + (b == null ? "missing block" : b.getClass().getName()) + ", not a "
                        + expected.getSimpleName() + " (or one in an FP32 island)";
                return ScriptedLayerSource.PLAIN;
            }
            if (!(b instanceof PrecisionIsland)) {
                return ScriptedLayerSource.PLAIN;
            }
            PrecisionIsland p = (PrecisionIsland) b;
            if (p.innerType() != DataType.FLOAT32 || !p.outerType().isFloating()
                    || (p.outerType() != DataType.FLOAT16 && p.outerType() != DataType.FLOAT32)) {
                why = name + " is an island from " + p.outerType() + " to " + p.innerType() + " (FP32 islands only)";
                return ScriptedLayerSource.PLAIN;
            }
            return p.outerType() == DataType.FLOAT16 ? ScriptedLayerSource.FP16 : ScriptedLayerSource.FP32;
        }

        int norm(Block b, String name) {
            if (why != null) {
                return ScriptedLayerSource.PLAIN;
            }
            int island = island(b, RmsNorm.class, name);
            if (why == null) {
                RmsNorm n = (RmsNorm) core(b);
                if (n.eps() != (float) config.rmsNormEps()) {
                    why = name + " eps " + n.eps() + " is not the config's " + config.rmsNormEps();
                } else {
                    out.add(n.weight());
                }
            }
            return island;
        }

        int gate(Block b, String name) {
            if (why != null) {
                return ScriptedLayerSource.PLAIN;
            }
            int island = island(b, MoeGate.class, name);
            if (why == null) {
                MoeGate g = (MoeGate) core(b);
                out.add(g.weight());
                if (config.isV3()) {
                    out.add(g.correctionBias());
                }
            }
            return island;
        }

        void swiglu(Block b, String name) {
            if (why != null) {
                return;
            }
            if (b == null || b.getClass() != DeepSeekMlp.class) {
                why = name + " is a " + (b == null ? "missing block" : b.getClass().getName()) + ", not a DeepSeekMlp";
                return;
            }
            DeepSeekMlp m = (DeepSeekMlp) b;
            linear(m.gateProj(), name + ".gate_proj");
            linear(m.upProj(), name + ".up_proj");
            linear(m.downProj(), name + ".down_proj");
        }
    }

    /** The block inside one precision island (the only decorator a qualifying child may have). */
    private static Block core(Block b) {
        return b instanceof PrecisionIsland ? ((PrecisionIsland) b).delegate() : b;
    }
}
