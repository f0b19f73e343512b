package ai.djl.memopt.nn;

import ai.djl.Device;
import ai.djl.ndarray.NDManager;
import ai.djl.pytorch.engine.PtNDManager;
import ai.djl.pytorch.engine.PtSymbolBlock;
import ai.djl.pytorch.jni.JniUtils;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;

/**
 * The generated TorchScript modules of this process (fused attention, the decode step, the scripted decoder layer):
 * each source is written as an archive by {@link TorchScriptArchive} and compiled by libtorch once, at its first use,
 * then shared by every caller and thread. The modules hold no tensors and live as long as the process.
 *
 * <pre>{@code
 * PtSymbolBlock module = TorchScriptModules.load("DecoderLayer", classBody); // compiled once per source
 * }</pre>
 */
public final class TorchScriptModules {

    private static final Map<String, PtSymbolBlock> MODULES = new ConcurrentHashMap<>();
    private static volatile NDManager manager;

    private TorchScriptModules() {}

    /**
     * The compiled module of a class (see {@link TorchScriptArchive#write} for the arguments), loaded once per process.
     *
     * @throws UncheckedIOException if libtorch cannot read the archive; libtorch's compile errors come as its exception
     */
    public static PtSymbolBlock load(String className, String classBody) {
        return MODULES.computeIfAbsent(className + '\n' + classBody, key -> {
            byte[] zip = TorchScriptArchive.write(className, classBody);
            try {
                return JniUtils.loadModule((PtNDManager) manager(), new ByteArrayInputStream(zip), false, false);
            } catch (IOException e) {
                throw new UncheckedIOException("cannot load the generated TorchScript module " + className, e);
            }
        });
    }

    private static NDManager manager() {
        if (manager == null) {
            synchronized (TorchScriptModules.class) {
                if (manager == null) {
                    manager = NDManager.newBaseManager(Device.cpu(), "PyTorch");
                }
            }
        }
        return manager;
    }
}
