package ai.djl.memopt.checkpoint;

import ai.djl.Model;
import ai.djl.training.GradientCollector;
import ai.djl.training.Trainer;
import ai.djl.training.TrainingConfig;

/**
 * A DJL {@link Trainer} whose {@link #newGradientCollector()} is a {@link CheckpointingGradientCollector}, so
 * {@code EasyTrain.fit} / {@code EasyTrain.trainBatch} train models with {@link CheckpointBlock}s unchanged:
 *
 * <pre>{@code
 * Checkpointing.wrapChildren(mlp, CheckpointPolicy.sqrtN());
 * try (Trainer trainer = new CheckpointingTrainer(model, config)) {
 *     trainer.initialize(inputShape);
 *     EasyTrain.trainBatch(trainer, batch);
 *     trainer.step();
 * }
 * }</pre>
 *
 * <p>{@code Model.newTrainer} cannot be told which trainer class to build, hence the constructor.
 */
public class CheckpointingTrainer extends Trainer {

    /** Creates a trainer for {@code model}, as {@code model.newTrainer(config)} would. */
    public CheckpointingTrainer(Model model, TrainingConfig config) {
        super(model, config);
    }

    /** {@inheritDoc} */
    @Override
    public GradientCollector newGradientCollector() {
        return new CheckpointingGradientCollector(getManager().getEngine());
    }
}
