package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDList;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.List;

/**
 * Calibration inputs for activation-aware methods: batches fed to the root block's {@code forward} (for a causal LM,
 * {@code NDList(input_ids (B, T))}). The Linear inputs they produce are captured with a temporary decorator; at most
 * {@code maxRowsPerLayer} activation rows per layer are kept for the output-error search (per-channel statistics use
 * every row). Layers are recorded in passes whose recordings fit {@code maxBytesPerPass}, so a large model is
 * calibrated in bounded memory (each pass runs the batches through the model again). The caller owns and closes the
 * arrays.
 */
public final class Calibration {

    private final List<NDList> batches;
    private final int maxRowsPerLayer;
    private final long maxBytesPerPass;

    private Calibration(List<NDList> batches, int maxRowsPerLayer, long maxBytesPerPass) {
        this.batches = batches;
        this.maxRowsPerLayer = maxRowsPerLayer;
        this.maxBytesPerPass = maxBytesPerPass;
    }

    /** Calibration on {@code batches}, keeping up to 512 rows per layer, recording at most 1 GiB per pass. */
    public static Calibration of(List<NDList> batches) {
        return of(batches, 512, 1L << 30);
    }

    /**
     * Calibration on {@code batches}.
     *
     * @param maxRowsPerLayer activation rows (tokens) kept per layer for the output-error search
     * @param maxBytesPerPass recorded FP32 activations held at once ({@code (rows + 1) * in * 4} per layer); the
     *     layers are recorded and quantized in as many passes over the batches as this needs
     */
    public static Calibration of(List<NDList> batches, int maxRowsPerLayer, long maxBytesPerPass) {
        Preconditions.checkArgument(batches != null && !batches.isEmpty(), "calibration needs at least one batch");
        Preconditions.checkArgument(maxRowsPerLayer > 0, "maxRowsPerLayer must be positive, got %s", maxRowsPerLayer);
        Preconditions.checkArgument(maxBytesPerPass > 0, "maxBytesPerPass must be positive, got %s", maxBytesPerPass);
        return new Calibration(ImmutableList.copyOf(batches), maxRowsPerLayer, maxBytesPerPass);
    }

    /** The batches. */
    public List<NDList> batches() {
        return batches;
    }

    /** Activation rows kept per layer for the search. */
    public int maxRowsPerLayer() {
        return maxRowsPerLayer;
    }

    /** Recording budget per pass over the batches, in bytes. */
    public long maxBytesPerPass() {
        return maxBytesPerPass;
    }
}
