package ai.djl.memopt.quantize;

import ai.djl.memopt.nn.BlockSite;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import com.google.common.base.Preconditions;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Optional;

/**
 * Magnitude pruning of the Linear weights of any DJL block tree, in place (the weights' arrays are multiplied by a
 * 0/1 mask, so parameters, their managers and any optimizer state stay the same objects).
 *
 * <ul>
 *   <li>Unstructured: exactly {@code round(sparsity * n)} of the smallest magnitudes are zeroed, per layer or over all
 *       selected layers together (global; ranks every weight at once, so it needs 8 bytes per weight of scratch).
 *   <li>2:4: in every group of 4 consecutive input weights of a row, the 2 largest magnitudes are kept (ties broken
 *       by the sort), exactly 50%. Store the result compactly with {@link Sparse24}.
 * </ul>
 *
 * Prune before quantizing: int8 and int4 (whose zero point is an integer) both represent 0 exactly, so the pattern
 * survives quantization; pruning a quantized layer is refused. Decorators (checkpointing, mixed precision, LoRA) may be
 * applied before or after: the Linear layers inside them are pruned (under mixed precision, the FP32 masters).
 *
 * <pre>{@code
 * PruningReport r = Pruner.prune(model, PruningConfig.twoFour());
 * }</pre>
 */
public final class Pruner {

    private Pruner() {}

    /**
     * Prunes {@code root} in place.
     *
     * @return measured sparsity per layer, and the Linear layers left dense with why
     * @throws IllegalArgumentException if a layer the filter selects is already quantized (prune first), or no Linear
     *     layer passes the filter (the message names the layer types seen)
     */
    public static PruningReport prune(Block root, PruningConfig config) {
        // decided on what computes at each path, seen through decorators and adapters; under mixed precision the FP32
        // masters are pruned (and the FP16 working copies follow), as if pruning had come first
        Map<String, BlockSite> sites = BlockTrees.sites(root);
        Map<String, BlockSite> targets = new LinkedHashMap<>();
        Map<String, String> skipped = new LinkedHashMap<>();
        boolean selected = false;
        for (BlockSite site : sites.values()) {
            String path = site.path();
            Block core = site.core();
            boolean quantized = core instanceof QuantizedLinear;
            if (!quantized && !(core instanceof Linear)) {
                continue;
            }
            Optional<String> reason = config.filter().skipReason(path, core);
            if (reason.isPresent()) {
                skipped.put(path, reason.get());
                continue;
            }
            selected = true;
            if (quantized) {
                throw new IllegalArgumentException("cannot prune '" + path + "': it is already quantized (" + core
                        + "); prune before quantizing (int8 and int4 keep pruned zeros exact), or skip it in the"
                        + " pruning filter");
            }
            long in = weight(site).getShape().get(1);
            if (config.pattern() == PruningConfig.Pattern.SEMI_STRUCTURED_2_4 && in % 4 != 0) {
                skipped.put(path, String.format(Locale.ROOT, "input dimension %d is not a multiple of 4", in));
                continue;
            }
            targets.put(path, site);
        }
        if (!selected) {
            List<Block> seen = new ArrayList<>();
            sites.values().stream().filter(s -> !s.path().isEmpty()).forEach(s -> seen.add(s.core()));
            throw new IllegalArgumentException("nothing to prune in " + root.getClass().getSimpleName()
                    + ": no Linear layer passes the filter" + (skipped.isEmpty() ? "" : " (skipped: " + skipped + ")")
                    + "; layer types seen: " + BlockTrees.describeTypes(seen));
        }
        List<PruningReport.Layer> layers = new ArrayList<>();
        if (config.pattern() == PruningConfig.Pattern.UNSTRUCTURED && config.global()) {
            List<NDArray> weights = new ArrayList<>();
            targets.values().forEach(site -> weights.add(weight(site)));
            pruneGlobal(weights, config.sparsity());
        }
        for (Map.Entry<String, BlockSite> t : targets.entrySet()) {
            BlockSite site = t.getValue();
            NDArray w = weight(site);
            if (config.pattern() == PruningConfig.Pattern.SEMI_STRUCTURED_2_4) {
                prune24(w);
            } else if (!config.global()) {
                pruneUnstructured(w, config.sparsity());
            }
            // -w * 0 is -0.0: adding +0 turns it into +0.0, so pruned weights compare and serialise as plain zeros
            w.addi(0f);
            site.valueChanged(weightParameter(site));
            long zeros;
            try (NDArray z = w.eq(0f)) {
                try (NDArray c = z.countNonzero()) {
                    zeros = c.toType(DataType.INT64, false).getLong();
                }
            }
            layers.add(new PruningReport.Layer(t.getKey(), zeros, w.size()));
        }
        return new PruningReport(config.pattern(), config.sparsity(), layers, skipped);
    }

    private static Parameter weightParameter(BlockSite site) {
        return site.core().getParameters().get("weight");
    }

    /** The weight values of the Linear at {@code site}: its master copy under mixed precision. */
    private static NDArray weight(BlockSite site) {
        return site.value(weightParameter(site));
    }

    /** Keep mask of the 2 largest of every 4 along the last axis of {@code abs (..., 4)}: exactly 2 true per group. */
    static NDArray topTwoOfFour(NDArray abs) {
        NDArray ranks = abs.argSort(-1).argSort(-1); // (..., 4) rank 0 = smallest
        return ranks.gte(2);
    }

    private static void prune24(NDArray w) {
        Shape shape = w.getShape();
        try (NDManager tmp = w.getManager().newSubManager(w.getDevice())) {
            NDArray a = Temps.copy(w, tmp, DataType.FLOAT32).abs().reshape(shape.get(0), shape.get(1) / 4, 4);
            NDArray keep = topTwoOfFour(a).reshape(shape).toType(w.getDataType(), false); // (out, in)
            w.muli(keep);
        }
    }

    private static void pruneUnstructured(NDArray w, double sparsity) {
        long k = Math.round(sparsity * w.size());
        try (NDManager tmp = w.getManager().newSubManager(w.getDevice())) {
            NDArray a = Temps.copy(w, tmp, DataType.FLOAT32).abs().flatten();
            NDArray ranks = a.argSort().argSort(); // rank of each weight, 0 = smallest
            w.muli(ranks.gte(k).reshape(w.getShape()).toType(w.getDataType(), false));
        }
    }

    private static void pruneGlobal(List<NDArray> weights, double sparsity) {
        NDArray first = weights.get(0);
        try (NDManager tmp = first.getManager().newSubManager(first.getDevice())) {
            NDList flat = new NDList();
            long total = 0;
            for (NDArray w : weights) {
                NDArray a = Temps.copy(w, tmp, DataType.FLOAT32).abs().flatten();
                flat.add(a);
                total += a.size();
            }
            long k = Math.round(sparsity * total);
            NDArray ranks = NDArrays.concat(flat).argSort().argSort(); // (total)
            ranks.attach(tmp);
            long offset = 0;
            for (NDArray w : weights) {
                Preconditions.checkState(w.getDevice().equals(first.getDevice()),
                        "global pruning needs every layer on one device");
                NDArray r = ranks.get(offset + ":" + (offset + w.size()));
                r.attach(tmp);
                w.muli(r.gte(k).reshape(w.getShape()).toType(w.getDataType(), false));
                offset += w.size();
            }
        }
    }
}
