package ai.djl.memopt.finetune;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.Shape;

/**
 * Splits a large array into blocks of whole rows (dimension 0) so that element-wise work on it (optimizer updates,
 * casts, finiteness checks) needs only block-sized temporaries. A block is a view: in-place operations on it write
 * into the array.
 */
final class RowBlocks {

    /** 2^20 elements: 4 MB per FP32 temporary. */
    static final long DEFAULT_BLOCK_ELEMENTS = 1L << 20;

    private RowBlocks() {}

    /** Rows per block for an array of {@code shape}: all rows when it is small or has at most one dimension. */
    static long rowsPerBlock(Shape shape, long blockElements) {
        if (shape.dimension() <= 1) {
            return Math.max(1, shape.dimension() == 0 ? 1 : shape.get(0));
        }
        long rows = shape.get(0);
        long perRow = Math.max(1, shape.size() / Math.max(1, rows));
        return Math.max(1, Math.min(rows, blockElements / perRow));
    }

    /**
     * Rows {@code [r0, r1)} of {@code a} as a view attached to {@code manager}, or {@code a} itself when one block
     * covers it.
     */
    static NDArray rows(NDArray a, long r0, long r1, long rowsPerBlock, long totalRows, NDManager manager) {
        if (rowsPerBlock >= totalRows) {
            return a;
        }
        NDArray view = a.get(new NDIndex("{}:{}", r0, r1));
        view.attach(manager);
        return view;
    }
}
