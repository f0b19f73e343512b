package ai.djl.memopt.examples.guide;

import ai.djl.Model;
import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.checkpoint.CheckpointingTrainer;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.SequentialBlock;
import ai.djl.training.DefaultTrainingConfig;
import ai.djl.training.EasyTrain;
import ai.djl.training.Trainer;
import ai.djl.training.TrainingConfig;
import ai.djl.training.dataset.Batch;
import ai.djl.training.dataset.Dataset;
import ai.djl.training.loss.Loss;
import ai.djl.training.optimizer.Optimizer;
import ai.djl.training.tracker.Tracker;
import java.util.List;

/** The guide's activation-checkpointing snippet. */
public final class CheckpointingSnippet {

    private CheckpointingSnippet() {}

    // guide:begin
    /** One epoch of your model with its children checkpointed; returns the paths of the wrapped children. */
    public static List<String> trainCheckpointed(SequentialBlock net, Dataset dataset, Shape inputShape)
            throws Exception {
        try (Model model = Model.newInstance("user-model")) {
            model.setBlock(net);
            List<String> wrapped = Checkpointing.wrapChildren(net, CheckpointPolicy.sqrtN()); // in place
            TrainingConfig config = new DefaultTrainingConfig(Loss.softmaxCrossEntropyLoss())
                    .optOptimizer(Optimizer.sgd().setLearningRateTracker(Tracker.fixed(0.05f)).build());
            try (Trainer trainer = new CheckpointingTrainer(model, config)) { // instead of model.newTrainer(config)
                trainer.initialize(inputShape);
                for (Batch batch : trainer.iterateDataset(dataset)) {
                    EasyTrain.trainBatch(trainer, batch);
                    trainer.step();
                    batch.close();
                }
            }
            return wrapped;
        }
    }
    // guide:end
}
