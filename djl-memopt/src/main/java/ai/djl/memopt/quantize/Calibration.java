package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDList;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.List;

/**
 * Calibration inputs for activation-aware methods: batches fed to the root block's {@code forward} (for a causal LM,
 * {@code NDList(input_ids (B, T))}). The Linear inputs they produce are captured with a temporary decorator; at most
 * {@code maxRowsPerLayer} activation rows per layer are kept for the output-error search (per-channel statistics use
 * every row). The caller owns and closes the arrays.
 */
public final class Calibration {

    private final List<NDList> batches;
    private final int maxRowsPerLayer;

    private Calibration(List<NDList> batches, int maxRowsPerLayer) {
        this.batches = batches;
        this.maxRowsPerLayer = maxRowsPerLayer;
    }

    /** Calibration on {@code batches}, keeping up to 2048 rows per layer for the search. */
    public static Calibration of(List<NDList> batches) {
        return of(batches, 2048);
    }

    /** Calibration on {@code batches}, keeping up to {@code maxRowsPerLayer} rows per layer. */
    public static Calibration of(List<NDList> batches, int maxRowsPerLayer) {
        Preconditions.checkArgument(batches != null && !batches.isEmpty(), "calibration needs at least one batch");
        Preconditions.checkArgument(maxRowsPerLayer > 0, "maxRowsPerLayer must be positive, got %s", maxRowsPerLayer);
        return new Calibration(ImmutableList.copyOf(batches), maxRowsPerLayer);
    }

    /** The batches. */
    public List<NDList> batches() {
        return batches;
    }

    /** Activation rows kept per layer for the search. */
    public int maxRowsPerLayer() {
        return maxRowsPerLayer;
    }
}
