package ai.djl.memopt.finetune;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.nn.Parameter;
import ai.djl.training.ParameterStore;

/**
 * The training step's {@link ParameterStore}: a parameter whose array is on the requested device is handed out as its
 * current array, not as the array the store saw first. DJL's store keeps the first array it handed out, while the
 * fused update gives a parameter a new handle when it frees the gradient ({@link GradientBuffers#release}); a layer
 * back-propagated again at a lower loss scale (a retry) after its experts were updated and freed recomputes with the
 * store its forward used, and must find their current handles, not the closed ones. Arrays on other devices are copied
 * and cached as DJL's store does.
 */
final class LiveParameterStore extends ParameterStore {

    LiveParameterStore(NDManager manager) {
        super(manager, false);
    }

    @Override
    public NDArray getValue(Parameter parameter, Device device, boolean training) {
        if (parameter != null && parameter.isInitialized()) {
            NDArray current = parameter.getArray();
            if (current.getDevice().equals(device)) {
                return current;
            }
        }
        return super.getValue(parameter, device, training);
    }
}
