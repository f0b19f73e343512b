package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.engine.Engine;
import ai.djl.ndarray.types.DataType;
import java.util.ArrayList;
import java.util.List;

/** Parsing of the shared {@code --device}, {@code --devices} and {@code --dtype} options. */
final class Devices {

    private Devices() {}

    /** {@code cpu}, {@code gpu}, {@code gpu:N} or {@code gpuN}. */
    static Device parse(String device) {
        return parse(device, "--device");
    }

    /** {@link #parse(String)}, naming {@code option} in its errors. */
    static Device parse(String device, String option) {
        String d = device.trim().toLowerCase(java.util.Locale.ROOT);
        if ("cpu".equals(d)) {
            return Device.cpu();
        }
        int id = -1;
        if ("gpu".equals(d)) {
            id = 0;
        } else if (d.matches("gpu:?[0-9]{1,4}")) {
            id = Integer.parseInt(d.substring(d.charAt(3) == ':' ? 4 : 3));
        }
        if (id < 0) {
            throw new IllegalArgumentException(option + " must be cpu, gpu, gpu:N or gpuN, got '" + device + "'");
        }
        int visible = Engine.getInstance().getGpuCount();
        if (id >= visible) {
            // fail here with the reason rather than deep inside the engine
            throw new IllegalArgumentException(option + " " + device + ": the engine sees " + visible + " GPU(s)"
                    + (visible == 0 ? " (a CPU build of libtorch, or no CUDA driver: see docs/gpu.md)"
                            : ", gpu0 to gpu" + (visible - 1)));
        }
        return Device.gpu(id);
    }

    /** A comma-separated list of {@link #parse(String) devices}, e.g. {@code gpu0,gpu1} or {@code cpu,cpu}. */
    static List<Device> parseList(String devices, String option) {
        List<Device> out = new ArrayList<>();
        for (String d : devices.split(",", -1)) {
            if (d.isBlank()) {
                throw new IllegalArgumentException(option + " '" + devices + "': an empty device name; expected a"
                        + " comma-separated list such as gpu0,gpu1 or cpu,cpu");
            }
            out.add(parse(d, option));
        }
        return List.copyOf(out);
    }

    /**
     * Loss-head chunk of the training commands on the CPU: small chunks keep the {@code (tokens, vocab)} logits and
     * their gradients small, which is what bounds a step's memory there.
     */
    static final int CPU_LOSS_CHUNK_TOKENS = 64;
    /**
     * Loss-head chunk on a GPU: each chunk costs a series of kernel launches and the device has the memory, so larger
     * chunks (a quarter of a 4 x 1024 batch) are faster at a bounded memory cost (FP32 logits of 1024 x vocab).
     */
    static final int GPU_LOSS_CHUNK_TOKENS = 1024;

    /** The {@code --loss-chunk} given, or the device's default. */
    static int lossChunkTokens(Integer option, Device device) {
        return option != null ? option : device.isGpu() ? GPU_LOSS_CHUNK_TOKENS : CPU_LOSS_CHUNK_TOKENS;
    }

    /** {@code fp32} or {@code fp16}. */
    static DataType dtype(String dtype) {
        switch (dtype.trim().toLowerCase(java.util.Locale.ROOT)) {
            case "fp32":
            case "float32":
                return DataType.FLOAT32;
            case "fp16":
            case "float16":
                return DataType.FLOAT16;
            default:
                throw new IllegalArgumentException("--dtype must be fp32 (float32) or fp16 (float16), got '" + dtype
                        + "' (DJL's PyTorch engine aborts on bfloat16; BF16 checkpoints load as either)");
        }
    }
}
