package ai.djl.memopt.finetune;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The buckets of {@link EightBitAdamW#stepAll}: consecutive parameters of one device, gradient type and kind of moments
 * laid end to end, at most {@link EightBitAdamW#chunkElements} elements a bucket, each updated as one chunk. A bucket
 * keeps its moments in flat arrays (8-bit: codes and block scales; FP32: the two moments) whose pieces are its members'
 * state arrays, as {@link AdamBuckets} does for AdamW; a quantized member's size is a multiple of the block size, so its
 * blocks are its own and its codes and scales are exactly what it would have alone. At each update the gradients and the
 * FP32 weights are concatenated, one {@link EightBitStep} runs on the bucket, and the updated weights are copied back
 * (into the working copies too): about 70 operations per bucket and two per member, instead of about 70 per parameter.
 *
 * <p>Plans are kept per list of ids (a whole model's, or each layer group's of a fused update) and rebuilt when a
 * weight array, a gradient type or a member's state object changes (a restored checkpoint replaces the state). A plan
 * for a list that shares parameters with an older plan replaces that plan.
 */
final class EightBitBuckets implements AutoCloseable {

    private final EightBitAdamW o;
    private final Map<List<String>, Plan> plans = new HashMap<>();

    EightBitBuckets(EightBitAdamW o) {
        this.o = o;
    }

    /** Updates the parameters (see {@link EightBitAdamW#stepAll}), planning their buckets if needed. */
    void update(List<String> ids, List<NDArray> masters, List<NDArray> grads, float gradDivisor,
            List<NDArray> copyTo) {
        Plan plan = plans.get(ids);
        if (plan == null || !plan.isCurrent(masters, grads)) {
            dropSharing(ids);
            plan = new Plan(ids, masters, grads);
            plans.put(List.copyOf(ids), plan);
        }
        plan.update(masters, grads, gradDivisor, copyTo);
    }

    /** The number of buckets planned for {@code ids} (0 if none): for tests. */
    int bucketCount(List<String> ids) {
        Plan plan = plans.get(ids);
        return plan == null ? 0 : plan.buckets.size();
    }

    private void dropSharing(List<String> ids) {
        for (Iterator<Map.Entry<List<String>, Plan>> it = plans.entrySet().iterator(); it.hasNext();) {
            Map.Entry<List<String>, Plan> e = it.next();
            if (!java.util.Collections.disjoint(e.getKey(), ids)) {
                e.getValue().close();
                it.remove();
            }
        }
    }

    /** Frees the buckets' own handles of their flat arrays (the members' views keep the storage). */
    @Override
    public void close() {
        for (Plan p : plans.values()) {
            p.close();
        }
        plans.clear();
    }

    /** The buckets of one list of parameters and those updated alone. */
    private final class Plan {
        final List<String> ids;
        final List<Integer> alone = new ArrayList<>();
        final List<Bucket> buckets = new ArrayList<>();

        Plan(List<String> ids, List<NDArray> masters, List<NDArray> grads) {
            this.ids = List.copyOf(ids);
            Map<String, List<Integer>> open = new LinkedHashMap<>(); // by device, gradient type, kind
            Map<String, Long> openSize = new HashMap<>();
            for (int i = 0; i < ids.size(); i++) {
                NDArray w = masters.get(i);
                MomentState s = o.state(ids.get(i), w);
                long n = w.size();
                long most = o.chunkBlocks(w.getDevice()) * o.blockSize();
                if (n > most || s.quantized && n % o.blockSize() != 0) {
                    alone.add(i);
                    continue;
                }
                String key = w.getDevice() + "/" + grads.get(i).getDataType() + "/" + s.quantized;
                List<Integer> members = open.get(key);
                if (members != null && openSize.get(key) + n > most) {
                    close(members, masters, grads);
                    members = null;
                }
                if (members == null) {
                    members = new ArrayList<>();
                    open.put(key, members);
                    openSize.put(key, 0L);
                }
                members.add(i);
                openSize.put(key, openSize.get(key) + n);
            }
            for (List<Integer> members : open.values()) {
                close(members, masters, grads);
            }
        }

        /** Ends a bucket: one of a single member is no bucket (nothing to gain). */
        private void close(List<Integer> members, List<NDArray> masters, List<NDArray> grads) {
            if (members.size() == 1) {
                alone.add(members.get(0));
            } else {
                buckets.add(new Bucket(members, ids, masters, grads));
            }
        }

        boolean isCurrent(List<NDArray> masters, List<NDArray> grads) {
            for (Bucket b : buckets) {
                if (!b.isCurrent(masters, grads)) {
                    return false;
                }
            }
            return true;
        }

        void update(List<NDArray> masters, List<NDArray> grads, float gradDivisor, List<NDArray> copyTo) {
            for (int i : alone) {
                o.step(ids.get(i), masters.get(i), grads.get(i), gradDivisor, copyTo == null ? null : copyTo.get(i));
            }
            for (Bucket b : buckets) {
                b.update(masters, grads, gradDivisor, copyTo);
            }
        }

        void close() {
            for (Bucket b : buckets) {
                b.close();
            }
            buckets.clear();
        }
    }

    /** Parameters updated together on flat arrays. */
    private final class Bucket {
        final int[] members; // indices into the lists passed to update
        final String[] ids;
        final long[] sizes;
        final NDArray[] sources; // the weights planned for (identity checked before each update)
        final NDArray[] flatWeights; // 1-D views of the weights
        final MomentState[] states; // the members' states: views of the flat arrays
        final MomentState flat; // the bucket's own state over the flat arrays
        final DataType gradType;
        final Device device;

        Bucket(List<Integer> members, List<String> allIds, List<NDArray> masters, List<NDArray> grads) {
            this.members = members.stream().mapToInt(Integer::intValue).toArray();
            this.ids = members.stream().map(allIds::get).toArray(String[]::new);
            this.sources = members.stream().map(masters::get).toArray(NDArray[]::new);
            this.sizes = Arrays.stream(sources).mapToLong(NDArray::size).toArray();
            this.states = Arrays.stream(ids).map(o.states::get).toArray(MomentState[]::new);
            this.gradType = grads.get(this.members[0]).getDataType();
            this.device = sources[0].getDevice();
            int n = this.members.length;
            this.flatWeights = new NDArray[n];
            for (int j = 0; j < n; j++) {
                flatWeights[j] = sources[j].reshape(-1);
                flatWeights[j].attach(o.manager);
            }
            long total = Arrays.stream(sizes).sum();
            boolean quantized = states[0].quantized;
            Shape shape = new Shape(total);
            if (quantized) {
                int block = o.blockSize();
                MomentState.Quantized first = flatQuantized(true, block);
                MomentState.Quantized second = flatQuantized(false, block);
                this.flat = MomentState.ofQuantized(shape, first, second);
                NDList firstCodes = split(first.codes, 1);
                NDList firstScales = split(first.absmax, block);
                NDList secondCodes = split(second.codes, 1);
                NDList secondScales = split(second.absmax, block);
                for (int j = 0; j < n; j++) {
                    replace(j, MomentState.ofQuantized(states[j].shape,
                            new MomentState.Quantized(firstCodes.get(j), firstScales.get(j), first.code, block),
                            new MomentState.Quantized(secondCodes.get(j), secondScales.get(j), second.code, block)));
                }
            } else {
                this.flat = MomentState.ofFp32(concat(j -> states[j].firstFp32), concat(j -> states[j].secondFp32));
                NDList firsts = split(flat.firstFp32, 1);
                NDList seconds = split(flat.secondFp32, 1);
                for (int j = 0; j < n; j++) {
                    replace(j, MomentState.ofFp32(reshaped(firsts.get(j), states[j].shape),
                            reshaped(seconds.get(j), states[j].shape)));
                }
            }
        }

        private MomentState.Quantized flatQuantized(boolean first, int block) {
            NDArray codes = concat(j -> (first ? states[j].first : states[j].second).codes);
            NDArray absmax = concat(j -> (first ? states[j].first : states[j].second).absmax);
            BlockwiseCode.OnDevice code = (first ? states[0].first : states[0].second).code;
            return new MomentState.Quantized(codes, absmax, code, block);
        }

        /** A new flat array in the optimizer's manager: the members' arrays (flattened) end to end. */
        private NDArray concat(java.util.function.IntFunction<NDArray> part) {
            try (NDManager t = o.manager.newSubManager(device)) {
                NDList parts = new NDList(states.length);
                for (int j = 0; j < states.length; j++) {
                    NDArray a = part.apply(j).reshape(-1);
                    a.attach(t);
                    parts.add(a);
                }
                NDArray out = NDArrays.concat(parts);
                out.attach(o.manager);
                return out;
            }
        }

        /** Consecutive 1-D views of {@code flat}, member {@code j}'s {@code sizes[j] / per} long, in the manager. */
        private NDList split(NDArray flat, long per) {
            long[] at = new long[sizes.length - 1];
            long offset = 0;
            for (int j = 0; j < at.length; j++) {
                offset += sizes[j] / per;
                at[j] = offset;
            }
            NDList pieces = flat.split(at);
            pieces.attach(o.manager);
            return pieces;
        }

        private NDArray reshaped(NDArray piece, Shape shape) {
            NDArray view = piece.reshape(shape);
            view.attach(o.manager);
            piece.close();
            return view;
        }

        /** Member {@code j}'s state becomes {@code view} (same step count); its old arrays are freed. */
        private void replace(int j, MomentState view) {
            view.step = states[j].step;
            states[j].close();
            states[j] = view;
            o.states.put(ids[j], view);
        }

        boolean isCurrent(List<NDArray> masters, List<NDArray> grads) {
            for (int j = 0; j < members.length; j++) {
                int i = members[j];
                if (i >= masters.size() || masters.get(i) != sources[j] || grads.get(i).getDataType() != gradType
                        || o.states.get(ids[j]) != states[j]) {
                    return false;
                }
            }
            return true;
        }

        void update(List<NDArray> masters, List<NDArray> grads, float gradDivisor, List<NDArray> copyTo) {
            long step = states[0].step;
            for (MomentState s : states) {
                if (s.step != step) { // a restored checkpoint may hold per-parameter counts
                    for (int j = 0; j < members.length; j++) {
                        int i = members[j];
                        o.step(ids[j], masters.get(i), grads.get(i), gradDivisor,
                                copyTo == null ? null : copyTo.get(i));
                    }
                    return;
                }
            }
            try (NDManager t = o.manager.newSubManager(device)) {
                NDArray g = endToEnd(grads, t);
                NDArray w = endToEnd(masters, t);
                for (MomentState s : states) {
                    s.step = step + 1;
                }
                flat.step = step + 1;
                EightBitStep.run(o, flat, w, g, null, gradDivisor, o.chunkBlocks(device), t);
                NDList pieces = split(w, 1);
                pieces.attach(t);
                for (int j = 0; j < members.length; j++) {
                    NDArray updated = pieces.get(j);
                    UpdateRules.copyInto(flatWeights[j], updated, t);
                    writeWorkingCopy(copyTo == null ? null : copyTo.get(members[j]), updated, t);
                }
            }
        }

        /** The members' arrays of {@code all}, flattened and concatenated: a new array in {@code t}. */
        private NDArray endToEnd(List<NDArray> all, NDManager t) {
            NDList flats = new NDList(members.length);
            for (int i : members) {
                NDArray view = all.get(i).reshape(-1);
                view.attach(t);
                flats.add(view);
            }
            NDArray out = NDArrays.concat(flats);
            out.attach(t);
            return out;
        }

        private void writeWorkingCopy(NDArray target, NDArray updated, NDManager t) {
            if (target != null) {
                NDArray flatTarget = target.reshape(-1);
                flatTarget.attach(t);
                UpdateRules.copyInto(flatTarget, updated, t);
            }
        }

        /** Frees the bucket's own handles (the members' views keep the storage) and the weight views. */
        void close() {
            flat.close();
            for (NDArray v : flatWeights) {
                v.close();
            }
        }
    }
}
