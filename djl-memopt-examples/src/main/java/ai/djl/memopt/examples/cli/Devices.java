package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.ndarray.types.DataType;

/** Parsing of the shared {@code --device} and {@code --dtype} options. */
final class Devices {

    private Devices() {}

    /** {@code cpu}, {@code gpu} or {@code gpu:N}. */
    static Device parse(String device) {
        String d = device.trim().toLowerCase(java.util.Locale.ROOT);
        if ("cpu".equals(d)) {
            return Device.cpu();
        }
        if ("gpu".equals(d)) {
            return Device.gpu();
        }
        if (d.startsWith("gpu:")) {
            try {
                return Device.gpu(Integer.parseInt(d.substring(4)));
            } catch (NumberFormatException e) {
                // falls through to the error below
            }
        }
        throw new IllegalArgumentException("--device must be cpu, gpu or gpu:N, got '" + device + "'");
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
                throw new IllegalArgumentException("--dtype must be fp32 or fp16, got '" + dtype + "' (bf16 is converted on load: use fp16)");
        }
    }
}
