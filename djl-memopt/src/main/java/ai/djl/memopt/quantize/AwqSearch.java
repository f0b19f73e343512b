package ai.djl.memopt.quantize;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;

/**
 * AWQ's scale search for one layer: for {@code alpha} in {@code 0, 1/n, ..., (n-1)/n}, input-channel scales
 * {@code s = max(mean|x|, 1e-4)^alpha / sqrt(max(s) min(s))}, quantize {@code W diag(s)}, and keep the alpha whose
 * effective weight {@code Q(W diag(s)) diag(s)^-1} gives the smallest mean squared error of the layer output
 * {@code X W^T} on the recorded activations. Salient (large-activation) input channels get scaled up before rounding,
 * so their weights lose relatively less precision. {@code alpha = 0} is exactly RTN, so the chosen weight is never
 * worse than RTN on the calibration rows.
 */
final class AwqSearch {

    static final class Result {
        final QuantizedTensor tensor;
        final double alpha;
        final double mse;

        Result(QuantizedTensor tensor, double alpha, double mse) {
            this.tensor = tensor;
            this.alpha = alpha;
            this.mse = mse;
        }
    }

    private AwqSearch() {}

    /**
     * @param weight (out, in)
     * @param rows recorded activations (n, in)
     * @param meanAbs mean |x| per input channel (in)
     * @return the best tensor, attached to the weight's manager (without input scales if alpha 0 won)
     */
    static Result search(NDArray weight, NDArray rows, NDArray meanAbs, QuantScheme scheme, int groupSize, int grid) {
        NDManager target = weight.getManager();
        try (NDManager tmp = target.newSubManager(weight.getDevice())) {
            NDArray w = Temps.copy(weight, tmp, DataType.FLOAT32); // (out, in)
            NDArray x = Temps.copy(rows, tmp, DataType.FLOAT32); // (n, in)
            NDArray m = Temps.copy(meanAbs, tmp, DataType.FLOAT32).maximum(1e-4f); // (in)
            NDArray yRef = x.matMul(w.transpose()); // (n, out)
            SchemeHandler handler = SchemeHandler.of(scheme);
            double bestAlpha = 0;
            double bestMse = Double.POSITIVE_INFINITY;
            for (int i = 0; i < grid; i++) {
                double alpha = (double) i / grid;
                // candidates are fake-quantized in float (no packing); only the winner is really quantized
                try (NDManager iter = tmp.newSubManager()) {
                    NDArray weff;
                    if (i == 0) {
                        weff = handler.fakeQuantize(w, groupSize); // (out, in)
                    } else {
                        NDArray s = m.pow((float) alpha); // (in)
                        s.attach(iter);
                        float norm = (float) Math.sqrt(s.max().getFloat() * s.min().getFloat());
                        NDArray sn = s.div(norm);
                        NDArray ws = w.mul(sn); // (out, in)
                        ws.attach(iter);
                        weff = handler.fakeQuantize(ws, groupSize).div(sn); // (out, in)
                    }
                    weff.attach(iter);
                    NDArray y = x.matMul(weff.transpose()); // (n, out), created in x's manager
                    y.attach(iter);
                    double mse = y.sub(yRef).square().mean().getFloat();
                    if (mse < bestMse) {
                        bestMse = mse;
                        bestAlpha = alpha;
                    }
                }
            }
            QuantizedTensor best;
            if (bestAlpha == 0) {
                best = handler.quantize(w, groupSize, null);
            } else {
                NDArray s = m.pow((float) bestAlpha); // (in)
                float norm = (float) Math.sqrt(s.max().getFloat() * s.min().getFloat());
                best = handler.quantize(w, groupSize, s.div(norm));
            }
            best.attach(target);
            return new Result(best, bestAlpha, bestMse);
        }
    }
}
