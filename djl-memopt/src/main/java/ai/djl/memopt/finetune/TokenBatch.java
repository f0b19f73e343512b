package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;
import java.util.Arrays;

/** A batch of token sequences {@code (rows, seq)}, row-major, on the Java heap until {@link #toNDArray}. Immutable. */
public final class TokenBatch {

    private final long[] ids;
    private final int rows;
    private final int seq;

    /**
     * @param ids row-major token ids, {@code rows * seq} of them
     */
    public TokenBatch(long[] ids, int rows, int seq) {
        Preconditions.checkArgument(rows >= 1 && seq >= 2, "a batch needs >= 1 row of >= 2 tokens, got (%s, %s)",
                rows, seq);
        Preconditions.checkArgument(ids.length == (long) rows * seq, "%s ids for a (%s, %s) batch", ids.length, rows,
                seq);
        this.ids = ids.clone();
        this.rows = rows;
        this.seq = seq;
    }

    /** A batch from rows of equal length. */
    public static TokenBatch of(long[][] rows) {
        Preconditions.checkArgument(rows.length >= 1, "no rows");
        int seq = rows[0].length;
        long[] flat = new long[rows.length * seq];
        for (int r = 0; r < rows.length; r++) {
            Preconditions.checkArgument(rows[r].length == seq, "row %s has %s tokens, row 0 has %s", r,
                    rows[r].length, seq);
            System.arraycopy(rows[r], 0, flat, r * seq, seq);
        }
        return new TokenBatch(flat, rows.length, seq);
    }

    public int rows() {
        return rows;
    }

    public int seq() {
        return seq;
    }

    /** Number of tokens ({@code rows * seq}). */
    public long tokens() {
        return (long) rows * seq;
    }

    /** Row {@code r}, a copy. */
    public long[] row(int r) {
        return Arrays.copyOfRange(ids, r * seq, (r + 1) * seq);
    }

    /** Rows {@code [from, to)} as a batch. */
    public TokenBatch slice(int from, int to) {
        Preconditions.checkArgument(0 <= from && from < to && to <= rows, "bad row range [%s, %s) of %s", from, to,
                rows);
        return new TokenBatch(Arrays.copyOfRange(ids, from * seq, to * seq), to - from, seq);
    }

    /** The ids as an INT64 {@code (rows, seq)} array in {@code manager}. */
    public NDArray toNDArray(NDManager manager) {
        return manager.create(ids, new Shape(rows, seq)); // (B, T)
    }

    /** The ids, row-major (the array itself: do not modify). */
    long[] ids() {
        return ids;
    }

    /** The largest id (to check against a vocabulary). */
    public long maxId() {
        long m = Long.MIN_VALUE;
        for (long id : ids) {
            m = Math.max(m, id);
        }
        return m;
    }
}
