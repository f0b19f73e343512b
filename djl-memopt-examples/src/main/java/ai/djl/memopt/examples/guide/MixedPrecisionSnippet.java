package ai.djl.memopt.examples.guide;

import ai.djl.engine.Engine;
import ai.djl.memopt.precision.MixedPrecisionBlock;
import ai.djl.memopt.precision.MixedPrecisionOptimizer;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import ai.djl.training.dataset.Batch;
import ai.djl.training.loss.Loss;
import ai.djl.training.optimizer.Optimizer;
import ai.djl.training.tracker.Tracker;
import java.util.ArrayList;
import java.util.List;

/** The guide's FP16 mixed-precision snippet. */
public final class MixedPrecisionSnippet {

    private MixedPrecisionSnippet() {}

    // guide:begin
    /** SGD in FP16 with FP32 master weights and dynamic loss scaling; returns the loss of each batch. */
    public static List<Float> trainMixedPrecision(Block block, Iterable<Batch> batches, Shape inputShape,
            NDManager manager) {
        block.initialize(manager, DataType.FLOAT32, inputShape); // FP32 first: these become the masters
        MixedPrecisionBlock net = MixedPrecisionBlock.wrap(block); // FP16 working weights; norms stay FP32
        MixedPrecisionOptimizer opt = MixedPrecisionOptimizer.builder().setBlock(net)
                .setOptimizer(Optimizer.sgd().setLearningRateTracker(Tracker.fixed(0.05f)).build())
                .build(); // DynamicLossScaler: 2^16, x2 every 2000 steps without overflow
        Loss loss = Loss.softmaxCrossEntropyLoss();
        List<Float> losses = new ArrayList<>();
        for (Batch batch : batches) {
            try (NDManager scope = manager.newSubManager()) {
                ParameterStore ps = new ParameterStore(scope, false);
                try (GradientCollector gc = Engine.getInstance().newGradientCollector()) {
                    NDArray value = loss.evaluate(batch.getLabels(), net.forward(ps, batch.getData(), true)); // FP32
                    losses.add(value.getFloat());
                    gc.backward(opt.scaleLoss(value));
                }
                opt.step(); // unscale in FP32, skip the step on inf/NaN, update masters, copy to FP16
            }
        }
        return losses;
    }
    // guide:end
}
