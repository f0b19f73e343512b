package ai.djl.memopt.checkpoint;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;

/** Shares the tiny DeepSeek configuration of the checkpoint tests with other test packages. */
public final class DeepSeekCheckpointTestAccess {

    private DeepSeekCheckpointTestAccess() {}

    public static DeepSeekConfig tiny(String type) {
        return DeepSeekCheckpointTest.tiny(type);
    }
}
