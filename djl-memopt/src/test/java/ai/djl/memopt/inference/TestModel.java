package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Path;

/** A DeepSeek checkpoint loaded into a manager the test owns. */
final class TestModel implements AutoCloseable {

    private final NDManager manager;
    private final DeepSeekForCausalLM model;

    private TestModel(NDManager manager, DeepSeekForCausalLM model) {
        this.manager = manager;
        this.model = model;
    }

    static TestModel load(Path dir, DataType dtype) throws IOException {
        NDManager manager = NDManager.newBaseManager(Device.cpu());
        try {
            return new TestModel(manager, DeepSeekLoader.load(dir, manager, dtype));
        } catch (IOException | RuntimeException e) {
            manager.close();
            throw e;
        }
    }

    DeepSeekForCausalLM model() {
        return model;
    }

    DeepSeekConfig config() {
        return model.config();
    }

    NDManager manager() {
        return manager;
    }

    @Override
    public void close() {
        manager.close();
    }
}
