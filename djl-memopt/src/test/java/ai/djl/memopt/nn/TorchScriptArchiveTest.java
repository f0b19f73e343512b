package ai.djl.memopt.nn;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;

import ai.djl.Device;
import ai.djl.memopt.inference.OneThread;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.Shape;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.engine.PtNDManager;
import ai.djl.pytorch.engine.PtSymbolBlock;
import ai.djl.pytorch.jni.IValue;
import ai.djl.pytorch.jni.JniUtils;
import java.io.ByteArrayInputStream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.extension.ExtendWith;

@ExtendWith(OneThread.class)
class TorchScriptArchiveTest {

    @Test
    void scriptedModuleMatchesEagerOps() throws Exception {
        String body = "  def forward(self: __torch__.Tiny, x: Tensor, y: Tensor) -> Tensor:\n"
                + "    return torch.add(torch.mul(torch.matmul(x, y), 2.0), 1.0)\n";
        byte[] zip = TorchScriptArchive.write("Tiny", body);
        try (NDManager m = NDManager.newBaseManager(Device.cpu());
                PtSymbolBlock block = JniUtils.loadModule((PtNDManager) m, new ByteArrayInputStream(zip), false, false)) {
            NDArray x = m.randomNormal(new Shape(3, 4));
            NDArray y = m.randomNormal(new Shape(4, 5));
            NDArray expected = x.matMul(y).mul(2.0f).add(1.0f);
            try (IValue a = IValue.from((PtNDArray) x); IValue b = IValue.from((PtNDArray) y);
                    IValue out = block.forward(a, b)) {
                NDArray got = out.toTensor((PtNDManager) m);
                assertArrayEquals(expected.toFloatArray(), got.toFloatArray(), 1e-6f);
            }
        }
    }
}
