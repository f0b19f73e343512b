package ai.djl.memopt.gguf;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.TokenEmbedding;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.QuantMethod;
import ai.djl.memopt.quantize.QuantizedEmbedding;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.QuantizedTensor;
import ai.djl.memopt.safetensors.OwnedArrays;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import com.google.common.base.Preconditions;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/**
 * Quantizes a float DeepSeek model in place into exactly what a GGUF export of a given type holds, in our own layers:
 * Q8_0/Q4_0 matrices become {@link QuantizedLinear} (and {@link QuantizedEmbedding} for the token table) with ggml's
 * blocks ({@link GgufBlocks}), computed by ggml's reference rounding ({@link GgmlQuants}); matrices the type leaves
 * in F16 (rows that are not whole blocks) and MLA's {@code kv_b_proj} (stored split and transposed,
 * {@link GgufLoader}) get the values the file will hold, in float; F32 tensors stay.
 *
 * <p>The result is "our quantized model" of that type: {@link GgufExporter} writes its blocks unchanged and
 * {@link GgufLoader} with {@code nativeQuantized} reads them back, so the model before export and after loading
 * compute the same.
 *
 * <pre>{@code
 * DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, manager, DataType.FLOAT32);
 * GgufQuantizer.quantize(lm, GgmlType.Q4_0);
 * GgufExporter.export(lm, dir, GgmlType.Q4_0, out, null);   // blocks copied as they are
 * }</pre>
 */
public final class GgufQuantizer {

    private GgufQuantizer() {}

    /**
     * Quantizes {@code lm} in place.
     *
     * @return the Hugging Face names of the weights now held as Q8_0/Q4_0 blocks
     */
    public static List<String> quantize(DeepSeekForCausalLM lm, GgmlType type) {
        Preconditions.checkArgument(type == GgmlType.F16 || type == GgmlType.Q8_0 || type == GgmlType.Q4_0,
                "quantize to F16, Q8_0 or Q4_0, not %s", type);
        DeepSeekConfig c = lm.config();
        List<String> quantized = new ArrayList<>();
        Map<String, Parameter> params = BlockTrees.parameters(lm);
        for (Map.Entry<String, Parameter> e : params.entrySet()) {
            String hf = e.getKey();
            NDArray w = e.getValue().getArray();
            DeepSeek2Tensors.Source s = DeepSeek2Tensors.source(hf);
            long[] shape = w.getShape().getShape();
            if (s.kind() == DeepSeek2Tensors.Kind.KV_B) {
                roundKvB(w, c, type);
                continue;
            }
            GgmlType t = GgufExporter.typeFor(s.gguf(), DeepSeek2Tensors.reverse(shape), type);
            if (t == GgmlType.F32) {
                continue;
            }
            float[] v = floats(w);
            byte[] blocks = GgmlQuants.quantize(t, v);
            if (!t.isQuantized()) {
                set(w, GgmlQuants.dequantize(t, ByteBuffer.wrap(blocks), v.length));
                continue;
            }
            String path = hf.substring(0, hf.lastIndexOf('.'));
            Block owner = BlockTrees.get(lm, path);
            NDManager m = w.getManager();
            QuantizedTensor q = GgufBlocks.toQuantized(t, ByteBuffer.wrap(blocks), shape[0], shape[1], m);
            DataType dtype = w.getDataType();
            if (owner instanceof TokenEmbedding) {
                e.getValue().close();
                BlockTrees.replace(lm, path, old -> QuantizedEmbedding.of(q, dtype, "weight"));
            } else if (owner instanceof Linear) {
                e.getValue().close();
                BlockTrees.replace(lm, path, old -> QuantizedLinear.of(q, null, dtype, QuantMethod.RTN));
            } else {
                q.close();
                throw new IllegalArgumentException("'" + hf + "' is not a Linear or embedding weight");
            }
            quantized.add(hf);
        }
        return quantized;
    }

    /** Rounds kv_b_proj through the types of attn_k_b and attn_v_b, as the file will hold it. */
    private static void roundKvB(NDArray w, DeepSeekConfig c, GgmlType type) {
        float[][] halves = DeepSeek2Tensors.splitKvB(floats(w), c);
        long[][] dims = DeepSeek2Tensors.kvBDims(c);
        String[] names = {"attn_k_b.weight", "attn_v_b.weight"};
        for (int i = 0; i < 2; i++) {
            GgmlType t = GgufExporter.typeFor(names[i], dims[i], type);
            halves[i] = GgmlQuants.dequantize(t, ByteBuffer.wrap(GgmlQuants.quantize(t, halves[i])), halves[i].length);
        }
        set(w, DeepSeek2Tensors.joinKvB(halves[0], halves[1], c));
    }

    private static float[] floats(NDArray w) {
        try (NDArray f = w.toType(DataType.FLOAT32, true)) {
            return f.toFloatArray();
        }
    }

    private static void set(NDArray w, float[] values) {
        try (NDArray f = OwnedArrays.of(w.getManager(), values, w.getShape())) {
            OwnedArrays.copyInto(w, f);
        }
    }
}
