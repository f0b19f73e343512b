package ai.djl.memopt.inference;

import ai.djl.engine.Engine;
import ai.djl.pytorch.jni.JniUtils;
import org.junit.jupiter.api.extension.AfterAllCallback;
import org.junit.jupiter.api.extension.BeforeAllCallback;
import org.junit.jupiter.api.extension.ExtensionContext;

/**
 * Runs a test class on one PyTorch intra-op thread: with the 2 cores shared by several builds, OpenMP's spinning worker
 * threads make the many small ops of a decode step 10-50x slower (measured). The previous count is restored after.
 */
public final class OneThread implements BeforeAllCallback, AfterAllCallback {

    private static final ExtensionContext.Namespace NS = ExtensionContext.Namespace.create(OneThread.class);

    @Override
    public void beforeAll(ExtensionContext context) {
        Engine.getInstance();
        context.getStore(NS).put("threads", JniUtils.getNumThreads());
        JniUtils.setNumThreads(1);
    }

    @Override
    public void afterAll(ExtensionContext context) {
        Integer threads = context.getStore(NS).get("threads", Integer.class);
        if (threads != null) {
            JniUtils.setNumThreads(threads);
        }
    }
}
