package ai.djl.memopt.checkpoint;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Model;
import ai.djl.engine.Engine;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Parameter;
import ai.djl.nn.SequentialBlock;
import ai.djl.training.DefaultTrainingConfig;
import ai.djl.training.EasyTrain;
import ai.djl.training.Trainer;
import ai.djl.training.TrainingConfig;
import ai.djl.training.dataset.ArrayDataset;
import ai.djl.training.dataset.Batch;
import ai.djl.training.loss.Loss;
import ai.djl.training.optimizer.Optimizer;
import ai.djl.training.tracker.Tracker;
import java.util.LinkedHashMap;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** EasyTrain with a CheckpointingTrainer trains exactly as with DJL's own Trainer. */
class CheckpointingTrainerTest {

    private static final java.util.List<CheckpointingGradientCollector> COLLECTORS = new java.util.ArrayList<>();

    private static Map<String, float[]> train(boolean checkpoint) throws Exception {
        try (NDManager manager = NDManager.newBaseManager(); Model model = Model.newInstance("mlp")) {
            Engine.getInstance().setRandomSeed(17);
            NDArray x = manager.randomNormal(new Shape(24, 7));
            NDArray y = manager.randomNormal(new Shape(24, 4));
            ArrayDataset data = new ArrayDataset.Builder().setData(x).optLabels(y).setSampling(8, false).build();
            SequentialBlock mlp = CheckpointTestModels.mlp();
            model.setBlock(mlp);
            if (checkpoint) {
                Checkpointing.wrapChildren(mlp, CheckpointPolicy.sqrtN(), true);
            }
            TrainingConfig config = new DefaultTrainingConfig(Loss.l2Loss())
                    .optOptimizer(Optimizer.sgd().setLearningRateTracker(Tracker.fixed(0.1f)).build());
            Trainer trainer = !checkpoint ? model.newTrainer(config) : new CheckpointingTrainer(model, config) {
                @Override
                public ai.djl.training.GradientCollector newGradientCollector() {
                    CheckpointingGradientCollector c = (CheckpointingGradientCollector) super.newGradientCollector();
                    COLLECTORS.add(c);
                    return c;
                }
            };
            try (trainer) {
                Engine.getInstance().setRandomSeed(5);
                trainer.initialize(new Shape(8, 7));
                for (int epoch = 0; epoch < 2; epoch++) {
                    for (Batch batch : trainer.iterateDataset(data)) {
                        EasyTrain.trainBatch(trainer, batch);
                        trainer.step();
                        batch.close();
                    }
                }
                Map<String, float[]> out = new LinkedHashMap<>();
                for (Map.Entry<String, Parameter> e : BlockTrees.parameters(mlp).entrySet()) {
                    out.put(e.getKey(), e.getValue().getArray().toFloatArray());
                }
                return out;
            }
        }
    }

    @Test
    void easyTrainWithCheckpointingMatchesPlainTraining() throws Exception {
        Map<String, float[]> plain = train(false);
        Map<String, float[]> checkpointed = train(true);
        // 6 batches, 3 segments each (sqrt(9) runs of 3 children): the checkpoints really ran
        assertEquals(6, COLLECTORS.size());
        for (CheckpointingGradientCollector c : COLLECTORS) {
            assertEquals(3, c.recordedSegments());
        }
        assertEquals(plain.keySet(), checkpointed.keySet());
        double diff = CheckpointTestModels.maxAbsDiff(plain, checkpointed);
        assertTrue(diff <= 1e-6, "parameters after 6 SGD steps differ by " + diff);
    }
}
