package ai.djl.memopt.finetune;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The flat buckets of {@link StatefulOptimizer#updateAll}: consecutive parameters of one gradient type, about
 * {@code bucketElements} elements each. A bucket's Adam moments live in one flat FP32 array each, whose pieces are the
 * parameters' state arrays; at every update the gradients and the FP32 weights are concatenated, one native Adam update
 * runs on the bucket, and the updated weights are copied back (into the FP16 working copies too).
 */
final class AdamBuckets implements AutoCloseable {

    private final List<Bucket> buckets = new ArrayList<>();
    private List<String> bucketIds; // the parameter ids the buckets were planned for

    /** Whether the buckets were planned for these parameters and their moments are still the buckets'. */
    boolean isCurrent(StatefulOptimizer o, List<String> ids, List<NDArray> weights, List<NDArray> grads) {
        if (!ids.equals(bucketIds)) {
            return false;
        }
        for (Bucket b : buckets) {
            if (!b.isCurrent(o, weights, grads)) {
                return false;
            }
        }
        return true;
    }

    /**
     * Groups consecutive parameters of the same weight and gradient types into buckets of about
     * {@code bucketElements} elements, and moves each one's moments into its bucket's flat arrays (copying moments
     * restored from a checkpoint, zeros otherwise).
     */
    void plan(StatefulOptimizer o, List<String> ids, List<NDArray> weights, List<NDArray> grads,
            long bucketElements) {
        close();
        Map<String, List<Integer>> byTypes = new LinkedHashMap<>();
        for (int i = 0; i < ids.size(); i++) {
            Preconditions.checkArgument(weights.get(i).getDataType() == DataType.FLOAT32,
                    "StatefulOptimizer updates FP32 weights (FP32 masters in mixed precision); %s is %s", ids.get(i),
                    weights.get(i).getDataType());
            Preconditions.checkArgument(grads.get(i).getShape().equals(weights.get(i).getShape()),
                    "gradient of %s has shape %s, the weight %s", ids.get(i), grads.get(i).getShape(),
                    weights.get(i).getShape());
            byTypes.computeIfAbsent(grads.get(i).getDataType() + "@" + weights.get(i).getDevice(),
                    k -> new ArrayList<>()).add(i);
        }
        for (List<Integer> group : byTypes.values()) {
            List<Integer> members = new ArrayList<>();
            long size = 0;
            for (int i : group) {
                members.add(i);
                size += weights.get(i).size();
                if (size >= bucketElements) {
                    buckets.add(new Bucket(o, members, ids, weights, grads));
                    members = new ArrayList<>();
                    size = 0;
                }
            }
            if (!members.isEmpty()) {
                buckets.add(new Bucket(o, members, ids, weights, grads));
            }
        }
        bucketIds = List.copyOf(ids);
    }

    /** Updates every bucket (see {@link StatefulOptimizer#updateAll}). */
    void update(StatefulOptimizer o, List<NDArray> weights, List<NDArray> grads, float gradDivisor,
            List<NDArray> copyTo) {
        for (Bucket b : buckets) {
            b.update(o, weights, grads, gradDivisor, copyTo);
        }
    }

    /** Frees the flat moments' own handles (the per-parameter views keep the storage) and forgets the plan. */
    @Override
    public void close() {
        for (Bucket b : buckets) {
            b.close();
        }
        buckets.clear();
        bucketIds = null;
    }

    /** Parameters updated together on flat arrays (see {@link StatefulOptimizer#updateAll}). */
    private static final class Bucket {
        final int[] members; // indices into the lists passed to updateAll
        final String[] ids;
        final long[] sizes;
        final NDArray[] sources; // the weight arrays this bucket was planned for (identity checked before each update)
        final NDArray[] flatWeights; // 1-D views of the weights
        final NDArray first;
        final NDArray second;
        final DataType gradType;

        Bucket(StatefulOptimizer o, List<Integer> members, List<String> allIds, List<NDArray> weights,
                List<NDArray> grads) {
            int n = members.size();
            this.members = members.stream().mapToInt(Integer::intValue).toArray();
            this.ids = new String[n];
            this.sizes = new long[n];
            this.sources = new NDArray[n];
            this.flatWeights = new NDArray[n];
            this.gradType = grads.get(this.members[0]).getDataType();
            NDList firsts = new NDList(n);
            NDList seconds = new NDList(n);
            long total = 0;
            for (int j = 0; j < n; j++) {
                int i = this.members[j];
                ids[j] = allIds.get(i);
                NDArray w = weights.get(i);
                sources[j] = w;
                sizes[j] = w.size();
                total += sizes[j];
                flatWeights[j] = w.reshape(-1);
                flatWeights[j].attach(o.manager);
                OptimizerState s = o.states.computeIfAbsent(ids[j], k -> new OptimizerState());
                firsts.add(s.first != null ? s.first.reshape(-1) : o.manager.zeros(new Shape(sizes[j]),
                        DataType.FLOAT32, w.getDevice()));
                seconds.add(s.second != null ? s.second.reshape(-1) : o.manager.zeros(new Shape(sizes[j]),
                        DataType.FLOAT32, w.getDevice()));
            }
            first = n == 1 ? firsts.get(0).duplicate() : NDArrays.concat(firsts); // (total) FP32
            second = n == 1 ? seconds.get(0).duplicate() : NDArrays.concat(seconds);
            first.attach(o.manager);
            second.attach(o.manager);
            firsts.close();
            seconds.close();
            // each parameter's moments become pieces of the flat arrays (for stateArrays, checkpoints, stateBytes)
            NDList firstPieces = split(first);
            NDList secondPieces = split(second);
            for (int j = 0; j < n; j++) {
                OptimizerState s = o.states.get(ids[j]);
                s.close();
                Shape shape = weights.get(this.members[j]).getShape();
                s.first = firstPieces.get(j).reshape(shape);
                s.second = secondPieces.get(j).reshape(shape);
                s.first.attach(o.manager);
                s.second.attach(o.manager);
            }
            firstPieces.close();
            secondPieces.close();
            Preconditions.checkState(total == first.size(), "bucket of %s elements, moments of %s", total,
                    first.size());
        }

        /** Consecutive 1-D pieces of {@code flat} of this bucket's sizes. */
        NDList split(NDArray flat) {
            if (sizes.length == 1) {
                return new NDList(flat.reshape(-1));
            }
            long[] at = new long[sizes.length - 1];
            long o = 0;
            for (int j = 0; j < at.length; j++) {
                o += sizes[j];
                at[j] = o;
            }
            return flat.split(at);
        }

        boolean isCurrent(StatefulOptimizer o, List<NDArray> weights, List<NDArray> grads) {
            for (int j = 0; j < members.length; j++) {
                int i = members[j];
                OptimizerState s = o.states.get(ids[j]);
                if (i >= weights.size() || weights.get(i) != sources[j] || grads.get(i).getDataType() != gradType
                        || s == null || s.first == null) {
                    return false;
                }
            }
            return true;
        }

        void update(StatefulOptimizer o, List<NDArray> weights, List<NDArray> grads, float gradDivisor,
                List<NDArray> copyTo) {
            long step = o.states.get(ids[0]).step + 1;
            for (String id : ids) {
                if (o.states.get(id).step + 1 != step) { // restored checkpoints may have per-parameter counts
                    for (int j = 0; j < members.length; j++) {
                        int i = members[j];
                        o.update(ids[j], weights.get(i), grads.get(i), gradDivisor,
                                copyTo == null ? null : copyTo.get(i));
                    }
                    return;
                }
            }
            Device device = weights.get(members[0]).getDevice();
            try (NDManager t = o.manager.newSubManager(device)) {
                NDList flatGrads = new NDList(members.length);
                NDList flatW = new NDList(members.length);
                for (int j = 0; j < members.length; j++) {
                    NDArray g = grads.get(members[j]).reshape(-1);
                    g.attach(t);
                    flatGrads.add(g);
                    flatW.add(flatWeights[j]);
                }
                NDArray g = members.length == 1 ? flatGrads.get(0) : NDArrays.concat(flatGrads);
                g.attach(t);
                if (g.getDataType() != DataType.FLOAT32) {
                    g = g.toType(DataType.FLOAT32, false);
                    g.attach(t);
                }
                NDArray w = members.length == 1 ? flatWeights[0] : NDArrays.concat(flatW);
                if (w != flatWeights[0]) {
                    w.attach(t);
                }
                for (String id : ids) {
                    o.states.get(id).step = step;
                }
                UpdateRules.nativeAdam(o, step, w, g, first, second, gradDivisor);
                NDList pieces = members.length == 1 ? new NDList(w) : split(w);
                for (int j = 0; j < members.length; j++) {
                    NDArray piece = pieces.get(j);
                    if (piece != flatWeights[j]) {
                        piece.attach(t);
                        UpdateRules.copyInto(flatWeights[j], piece, t);
                    }
                    NDArray target = copyTo == null ? null : copyTo.get(members[j]);
                    if (target != null) {
                        NDArray flatTarget = target.reshape(-1);
                        flatTarget.attach(t);
                        UpdateRules.copyInto(flatTarget, flatWeights[j], t);
                    }
                }
            }
        }

        void close() {
            first.close();
            second.close();
            for (NDArray v : flatWeights) {
                v.close();
            }
        }
    }
}
