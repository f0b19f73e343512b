package ai.djl.memopt.nn;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.pytorch.engine.PtSymbolBlock;
import ai.djl.pytorch.jni.IValueUtils;
import com.google.common.base.Preconditions;

/**
 * Causal scaled dot-product attention through PyTorch's fused kernel ({@code torch.scaled_dot_product_attention}),
 * called from a one-line TorchScript module that {@link TorchScriptArchive} writes: DJL 0.36 has no binding for the
 * operator, but a scripted module called in training mode records autograd like any other operator, so the fused
 * backward runs too.
 *
 * <p>On a GPU the kernel (memory-efficient or flash) never materialises the {@code (B, H, T, T)} scores: the eager
 * formula's scores, FP32 softmax and their gradients, about 1 GB per layer of bench-small at batch 4, sequence 1024,
 * become {@code O(B H T)} statistics, and a layer's attention is a handful of kernels instead of a dozen operators.
 *
 * <p>Shapes: {@code query (B, H, T, d)}, {@code key (B, H, T, d)}, {@code value (B, H, T, v)} of one type (FP32 or
 * FP16); the result {@code (B, H, T, v)} in that type. Query {@code i} attends to keys {@code 0..i} (the causal mask of
 * a sequence without padding and without a cache); other masks take the eager path of the caller.
 *
 * <pre>{@code
 * if (FusedAttention.enabled(query.getDevice())) {
 *     NDArray out = FusedAttention.causal(query, key, value, scale); // (B, H, T, v)
 * }
 * }</pre>
 *
 * <p>{@value #KERNEL_PROPERTY} chooses: {@code fused}, {@code eager}, or unset for fused on a GPU and eager on the CPU
 * (where the eager path is what the CPU memory targets and fixtures were measured with).
 */
public final class FusedAttention {

    /** System property: {@code fused} or {@code eager}; unset means fused on a GPU only. */
    public static final String KERNEL_PROPERTY = "ai.djl.memopt.attention.kernel";

    private static final String CLASS = "CausalAttention";

    private FusedAttention() {}

    /**
     * Whether attention on {@code device} takes the fused kernel.
     *
     * @throws IllegalArgumentException if {@value #KERNEL_PROPERTY} is set to something else than fused or eager
     */
    public static boolean enabled(Device device) {
        return DeviceDefaultSwitch.enabled(KERNEL_PROPERTY, "fused", "eager", device);
    }

    /**
     * Causal attention {@code softmax(scale * q k^T + causal) v} in one fused operator.
     *
     * @param query {@code (B, H, T, d)}
     * @param key {@code (B, H, T, d)}
     * @param value {@code (B, H, T, v)}
     * @param scale the factor of the scores, {@code d^-0.5} or a model's own
     * @return {@code (B, H, T, v)} in the query's type and manager
     */
    public static NDArray causal(NDArray query, NDArray key, NDArray value, float scale) {
        Preconditions.checkArgument(query.getShape().dimension() == 4 && key.getShape().dimension() == 4
                && value.getShape().dimension() == 4, "query %s, key %s and value %s must be (B, H, T, dim)",
                query.getShape(), key.getShape(), value.getShape());
        Preconditions.checkArgument(query.getShape().get(2) == key.getShape().get(2)
                && key.getShape().get(2) == value.getShape().get(2),
                "causal fused attention needs as many keys as queries: query %s, key %s, value %s",
                query.getShape(), key.getShape(), value.getShape());
        Preconditions.checkArgument(query.getDataType() == key.getDataType()
                && key.getDataType() == value.getDataType(), "query %s, key %s and value %s must share one type",
                query.getDataType(), key.getDataType(), value.getDataType());
        checkUnnamed(query, "query");
        checkUnnamed(key, "key");
        checkUnnamed(value, "value");
        // training=true: no JIT call guard, so the operator records autograd whenever the thread's grad mode is on
        NDList out = IValueUtils.forward(module(scale), new NDList(query, key, value), true);
        return out.head();
    }

    /** DJL routes inputs by name (lists, tuples, methods): an unnamed array is passed as one tensor. */
    private static void checkUnnamed(NDArray array, String what) {
        String name = array.getName();
        Preconditions.checkArgument(name == null || name.isEmpty() || name.matches("[A-Za-z0-9_]+"),
                "the %s passed to fused attention is named '%s', which DJL would read as a list or method", what, name);
    }

    /** The TorchScript source of the module for one scale (a literal, so the module takes tensors only). */
    static String classBody(float scale) {
        return "  def forward(self: __torch__." + CLASS + ", query: Tensor, key: Tensor, value: Tensor) -> Tensor:\n"
                + "    return torch.scaled_dot_product_attention(query, key, value, None, 0., True, scale="
                + Double.toString(scale) + ")\n"; // the float's exact value
    }

    private static PtSymbolBlock module(float scale) {
        Preconditions.checkArgument(Float.isFinite(scale) && scale > 0, "attention scale %s must be positive", scale);
        return TorchScriptModules.load(CLASS, classBody(scale));
    }
}
