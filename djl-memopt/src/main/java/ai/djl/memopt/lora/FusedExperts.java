package ai.djl.memopt.lora;

import ai.djl.memopt.safetensors.OwnedArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import java.util.Arrays;
import java.util.List;

/**
 * PEFT's fused routed-expert LoRA ({@link PeftLayout}) to and from the per-expert adapters of our model, exactly.
 *
 * <p>PEFT's delta of a fused parameter for expert {@code e} is {@code scale * B_e A_e} with
 * {@code A_e = A[e*r : e*r+r, :]} {@code (r, in)} and {@code B_e[:, k] = B[:, k*E + e]} {@code (out, r)}. For
 * {@code gate_up_proj}, {@code out} is the expert's gate rows then its up rows, so the expert's {@code gate_proj}
 * adapter is {@code (A_e, B_e[:I])} and its {@code up_proj} adapter {@code (A_e, B_e[I:])}: the same {@code A_e}
 * twice, each of rank {@code r}, with the fused adapter's scale.
 *
 * <p>Back the other way, separate gate and up adapters {@code (A_g, B_g)}, {@code (A_u, B_u)} of one scale are the
 * fused adapter {@code A_e = [A_g; A_u]}, {@code B_e = [[B_g, 0], [0, B_u]]} of rank {@code r_g + r_u} (what PEFT's own
 * conversion of per-expert adapters writes); when gate and up share an identical {@code A} (as after loading a PEFT
 * adapter) the fused adapter is {@code A_e = A_g}, {@code B_e = [B_g; B_u]} of rank {@code r_g}, the file it came from.
 * Experts without an adapter, and ranks below the largest, are zero rows and columns: the delta is the same.
 */
final class FusedExperts {

    private FusedExperts() {}

    /** One expert projection's adapter as float arrays (row-major), or its absence ({@code rank == 0}). */
    static final class Part {
        final int rank;
        final long out;
        final long in;
        final float[] a; // (rank, in)
        final float[] b; // (out, rank)

        Part(int rank, long out, long in, float[] a, float[] b) {
            this.rank = rank;
            this.out = out;
            this.in = in;
            this.a = a;
            this.b = b;
        }

        static Part of(LoraLinear l, NDManager scope) {
            return new Part(l.rank(), l.outFeatures(), l.inFeatures(), floats(l.loraA().getArray(), scope),
                    floats(l.loraB().getArray(), scope));
        }

        static Part none(long out, long in) {
            return new Part(0, out, in, new float[0], new float[0]);
        }
    }

    /** The fused tensors of one parameter: {@code a (E*r, in)}, {@code b (out, r*E)}. */
    static final class Fused {
        final int rank;
        final float[] a;
        final float[] b;

        Fused(int rank, float[] a, float[] b) {
            this.rank = rank;
            this.a = a;
            this.b = b;
        }
    }

    static float[] floats(NDArray array, NDManager scope) {
        if (array.getDataType() == DataType.FLOAT32) {
            return array.toFloatArray();
        }
        NDArray f = array.toType(DataType.FLOAT32, true);
        f.attach(scope);
        return f.toFloatArray();
    }

    /**
     * Fuses each expert's parts ({gate, up} or {down}) into one parameter's tensors.
     *
     * @param parts {@code parts[e]}: expert e's projections in output order
     */
    static Fused fuse(List<Part[]> parts) {
        int experts = parts.size();
        int first = parts.get(0)[0].rank;
        boolean shared = first > 0;
        int rank = 0;
        for (Part[] p : parts) {
            int sum = 0;
            for (Part q : p) {
                sum += q.rank;
                shared &= q.rank == first && Arrays.equals(q.a, p[0].a);
            }
            rank = Math.max(rank, sum);
        }
        if (shared) {
            rank = first;
        }
        long in = parts.get(0)[0].in;
        long out = 0;
        for (Part q : parts.get(0)) {
            out += q.out;
        }
        float[] a = new float[Math.toIntExact(experts * rank * in)];
        float[] b = new float[Math.toIntExact(out * rank * experts)];
        for (int e = 0; e < experts; e++) {
            int col = 0; // first rank column of this part in B_e
            long row = 0; // first output row of this part
            for (Part q : parts.get(e)) {
                if (!shared || col == 0) {
                    System.arraycopy(q.a, 0, a, Math.toIntExact((e * (long) rank + col) * in), q.a.length);
                }
                for (long o = 0; o < q.out; o++) {
                    for (int k = 0; k < q.rank; k++) {
                        b[Math.toIntExact((row + o) * rank * experts + (long) (col + k) * experts + e)] =
                                q.b[Math.toIntExact(o * q.rank + k)];
                    }
                }
                row += q.out;
                col += shared ? 0 : q.rank;
            }
        }
        return new Fused(rank, a, b);
    }

    /**
     * Expert {@code e}'s adapters from fused tensors: for each output block (gate then up, or down) the pair
     * {@code A_e (r, in)}, {@code B_e[rows] (rows, r)}, as arrays of {@code manager}.
     *
     * @param outs the output rows of each projection of the expert, in order
     * @return {@code [projection][0 = A, 1 = B]}
     */
    static NDArray[][] split(float[] a, float[] b, int experts, int rank, long in, long[] outs, int e,
            NDManager manager) {
        long total = Arrays.stream(outs).sum();
        float[] ae = Arrays.copyOfRange(a, Math.toIntExact(e * rank * in), Math.toIntExact((e + 1) * rank * in));
        NDArray[][] out = new NDArray[outs.length][];
        long row = 0;
        for (int p = 0; p < outs.length; p++) {
            float[] be = new float[Math.toIntExact(outs[p] * rank)];
            for (long o = 0; o < outs[p]; o++) {
                for (int k = 0; k < rank; k++) {
                    be[Math.toIntExact(o * rank + k)] = b[Math.toIntExact((row + o) * rank * experts
                            + (long) k * experts + e)];
                }
            }
            out[p] = new NDArray[] {OwnedArrays.of(manager, ae, new Shape(rank, in)),
                OwnedArrays.of(manager, be, new Shape(outs[p], rank))};
            row += outs[p];
        }
        if (row != total) {
            throw new AssertionError(row + " != " + total);
        }
        return out;
    }
}
