package ai.djl.memopt.precision;

import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.types.DataType;
import java.util.Locale;

/** Data type checks shared by the mixed-precision classes. */
public final class Precisions {

    static final String BF16_MESSAGE = TypeCasts.BF16_MESSAGE;

    private Precisions() {}

    /**
     * Parses a precision name as the CLI spells it: {@code fp16}/{@code float16}/{@code half}, {@code fp32}/
     * {@code float32}.
     *
     * @throws UnsupportedOperationException for {@code bf16}/{@code bfloat16} (see {@link #checkSupported})
     * @throws IllegalArgumentException for anything else, naming the value
     */
    public static DataType parse(String name) {
        String n = name.trim().toLowerCase(Locale.ROOT);
        switch (n) {
            case "fp16":
            case "float16":
            case "half":
                return DataType.FLOAT16;
            case "fp32":
            case "float32":
            case "float":
                return DataType.FLOAT32;
            case "bf16":
            case "bfloat16":
                throw new UnsupportedOperationException(BF16_MESSAGE);
            default:
                throw new IllegalArgumentException("unknown precision '" + name + "': expected fp16 or fp32");
        }
    }

    /**
     * Casts an array so that autograd differentiates through the cast. DJL 0.36's {@code NDArray.toType} runs
     * {@code Tensor.to} under a {@code NoGradGuard}: its result has no {@code grad_fn}, so a {@code toType} inside a
     * training forward silently cuts the graph (nothing before it gets a gradient). Use this for every floating cast
     * on a training path (FP16 activations into FP32 norms/softmax/logits and back). With grad mode off it is
     * {@code toType}; otherwise a copy into a fresh array of the target type ({@code copy_}, whose backward casts the
     * gradient back).
     *
     * @throws UnsupportedOperationException for BF16
     */
    public static NDArray cast(NDArray array, DataType type) {
        return TypeCasts.cast(array, type);
    }

    /**
     * Rejects {@link DataType#BFLOAT16} before it reaches DJL.
     *
     * @return {@code type}
     * @throws UnsupportedOperationException for BF16
     */
    public static DataType checkSupported(DataType type) {
        return TypeCasts.checkSupported(type);
    }
}
