package ai.djl.memopt.lora;

import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The LoRA layers of an adapter as PEFT stores them: one per adapted module or 2-D parameter, and one per fused
 * routed-expert parameter ({@link LoraTargets}), with the tensor names PEFT gives them.
 *
 * <p>A fused parameter's {@code lora_A} is {@code (E*r, in)} with expert {@code e}'s rows at {@code e*r .. e*r+r-1},
 * and its {@code lora_B} {@code (out, r*E)} with expert {@code e}'s column {@code k} at {@code k*E + e} (PEFT's
 * {@code ParamWrapper.get_delta_weight}: {@code A.reshape(E, r, in)}, {@code B.reshape(out, r, E)}, delta
 * {@code einsum("o r e, e r i -> e o i") * scaling}). For {@code gate_up_proj} the outputs are the expert's
 * {@code gate_proj} rows then its {@code up_proj} rows. Two parameters of one module are nested wrappers: with both
 * adapted, {@code gate_up_proj} (registered first, wrapped first) is the inner one, stored under
 * {@code <group>.base_layer}, and {@code down_proj} under {@code <group>}.
 */
final class PeftLayout {

    private PeftLayout() {}

    /** What a PEFT LoRA layer adapts. */
    enum Kind { MODULE, PARAMETER, GATE_UP, DOWN }

    /** One LoRA layer as stored: the adapted projections, the key its rank is looked up with, the tensor prefix. */
    static final class Unit {
        final Kind kind;
        final String key;
        final String prefix;
        /** The adapted projection paths: one, or for a fused parameter each expert's (gate then up for GATE_UP). */
        final List<String> paths;
        final int experts;
        final int rank;
        final float alpha;

        Unit(Kind kind, String key, String prefix, List<String> paths, int experts, int rank, float alpha) {
            this.kind = kind;
            this.key = key;
            this.prefix = prefix;
            this.paths = ImmutableList.copyOf(paths);
            this.experts = experts;
            this.rank = rank;
            this.alpha = alpha;
        }

        boolean fused() {
            return kind == Kind.GATE_UP || kind == Kind.DOWN;
        }

        String nameA() {
            return PeftAdapters.PREFIX + prefix + ".lora_A.weight";
        }

        String nameB() {
            return PeftAdapters.PREFIX + prefix + ".lora_B.weight";
        }

        /** Expert {@code e}'s projections: {gate, up} for GATE_UP, {down} for DOWN. */
        List<String> expertPaths(int e) {
            int per = kind == Kind.GATE_UP ? 2 : 1;
            return paths.subList(per * e, per * e + per);
        }

        @Override
        public String toString() {
            return key + " (r=" + rank + ", alpha=" + alpha + ")";
        }
    }

    /**
     * The units for a list of targets (from a config, or from the adapters a model carries): one per module or 2-D
     * parameter target; the targets of one fused parameter key together, rank and alpha from the target.
     */
    static List<Unit> units(LoraTargets.View view, List<LoraTargets.Target> targets) {
        Map<String, List<LoraTargets.Target>> fused = new LinkedHashMap<>();
        List<Unit> out = new ArrayList<>();
        for (LoraTargets.Target t : targets) {
            if (t.fused()) {
                fused.computeIfAbsent(t.key, k -> new ArrayList<>()).add(t);
            } else {
                out.add(new Unit(t.key.equals(t.path) ? Kind.MODULE : Kind.PARAMETER, t.key, t.path, List.of(t.path),
                        1, t.rank, t.alpha));
            }
        }
        for (Map.Entry<String, List<LoraTargets.Target>> e : fused.entrySet()) {
            String key = e.getKey();
            String group = key.substring(0, key.lastIndexOf('.'));
            boolean gateUp = key.endsWith(".gate_up_proj");
            int experts = view.groups.get(group);
            List<String> paths = new ArrayList<>();
            for (int i = 0; i < experts; i++) {
                for (String proj : gateUp ? List.of("gate_proj", "up_proj") : List.of("down_proj")) {
                    paths.add(group + "." + i + "." + proj);
                }
            }
            LoraTargets.Target first = e.getValue().get(0);
            boolean nested = gateUp && fused.containsKey(group + ".down_proj");
            out.add(new Unit(gateUp ? Kind.GATE_UP : Kind.DOWN, key, nested ? group + ".base_layer" : group, paths,
                    experts, first.rank, first.alpha));
        }
        return ImmutableList.copyOf(out);
    }

    /** {out, in} of a projection (an adapter's base for a LoraLinear). */
    static long[] features(Block block, String path, Block root) {
        if (block instanceof LoraLinear) {
            LoraLinear l = (LoraLinear) block;
            return new long[] {l.outFeatures(), l.inFeatures()};
        }
        if (block instanceof Linear) {
            Parameter w = block.getParameters().get("weight");
            Preconditions.checkArgument(w.isInitialized(), "projection '%s' has no weight yet", path);
            Shape s = w.getArray().getShape();
            return new long[] {s.get(0), s.get(1)};
        }
        NDManager parent = null;
        for (Block b : new Block[] {block, root}) {
            for (Parameter p : b.getParameters().values()) {
                if (parent == null && p.isInitialized()) {
                    parent = p.getArray().getManager();
                }
            }
        }
        Preconditions.checkArgument(parent != null, "cannot read the dimensions of '%s' (%s)", path,
                block.getClass().getSimpleName());
        try (NDManager probe = parent.newSubManager()) {
            Shape s = LinearWeightSource.weightOf(block, probe).getShape();
            return new long[] {s.get(0), s.get(1)};
        }
    }

    /**
     * The expected shapes {lora_A, lora_B} of a unit on this model: {@code (r, in), (out, r)}; fused
     * {@code (E*r, in), (out, r*E)} with {@code out} the sum of gate and up rows for GATE_UP.
     *
     * @throws IllegalArgumentException if the experts of a group differ in shape
     */
    static long[][] shapes(Unit u, Map<String, Block> modules, Block root) {
        if (!u.fused()) {
            long[] f = features(modules.get(u.paths.get(0)), u.paths.get(0), root);
            return new long[][] {{u.rank, f[1]}, {f[0], u.rank}};
        }
        long[] first = expertFeatures(u, 0, modules, root);
        for (int e = 1; e < u.experts; e++) {
            long[] f = expertFeatures(u, e, modules, root);
            Preconditions.checkArgument(f[0] == first[0] && f[1] == first[1],
                    "routed experts of '%s' differ in shape: expert 0 (out %s, in %s), expert %s (out %s, in %s)",
                    u.key, first[0], first[1], e, f[0], f[1]);
        }
        long r = u.rank;
        return new long[][] {{u.experts * r, first[1]}, {first[0], r * u.experts}};
    }

    /** {total out, in} of expert {@code e}'s projections in a fused unit. */
    static long[] expertFeatures(Unit u, int e, Map<String, Block> modules, Block root) {
        long out = 0;
        long in = -1;
        for (String p : u.expertPaths(e)) {
            long[] f = features(modules.get(p), p, root);
            Preconditions.checkArgument(in < 0 || f[1] == in, "'%s' has %s inputs, its gate_proj %s", p, f[1], in);
            out += f[0];
            in = f[1];
        }
        return new long[] {out, in};
    }
}
