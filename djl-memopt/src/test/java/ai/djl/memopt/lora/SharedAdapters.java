package ai.djl.memopt.lora;

import ai.djl.engine.Engine;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import java.util.Map;

/** Test support: two models with LoRA applied the same way get the same adapter weights. */
public final class SharedAdapters {

    private SharedAdapters() {}

    /**
     * Gives every adapter of {@code model} a random {@code B ~ N(0, 0.05)} (drawn with {@code seed}; B is zero after
     * {@link Lora#apply}, and a nonzero B lets A get gradients too) and copies A and B into the adapter of the same
     * path in {@code twin}.
     *
     * @return the twin's adapters by path
     */
    public static Map<String, LoraLinear> randomizeAndCopy(Block model, Block twin, NDManager manager, int seed) {
        Engine.getInstance().setRandomSeed(seed);
        Map<String, LoraLinear> twinAdapters = Lora.adapters(twin);
        for (Map.Entry<String, LoraLinear> e : Lora.adapters(model).entrySet()) {
            LoraLinear l = e.getValue();
            NDArray b = manager.randomNormal(0, 0.05f, l.loraB().getArray().getShape(), DataType.FLOAT32);
            l.setAdapterWeights(l.loraA().getArray(), b);
            twinAdapters.get(e.getKey()).setAdapterWeights(l.loraA().getArray(), b);
        }
        return twinAdapters;
    }
}
