package ai.djl.memopt.gguf;

import ai.djl.memopt.model.deepseek.DeepSeekConfig;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.LayerPlacement;
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
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.core.Linear;
import ai.djl.training.initializer.Initializer;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Loads a GGUF file of llama.cpp's {@code deepseek2} architecture (F32, F16, BF16, Q8_0, Q4_0 tensors) into a
 * {@link DeepSeekForCausalLM}, tensor by tensor from a memory mapping.
 *
 * <p>With {@code nativeQuantized}, Q8_0 and Q4_0 matrices become {@link QuantizedLinear} layers (and a quantized
 * {@code token_embd} a {@link QuantizedEmbedding}) holding ggml's integers and scales as they are
 * ({@link GgufBlocks}): int8 with groups of 32, int4 with groups of 32 and zero point 8; their float weights are
 * never allocated. MLA's {@code kv_b_proj} is the exception: llama.cpp stores its key half transposed
 * ({@code attn_k_b}), so its blocks run along the other axis of our weight, and it is loaded in float. Without
 * {@code nativeQuantized} every tensor is dequantized into the float model.
 *
 * <p>Every parameter must find its tensor with the expected dimensions; a missing tensor, wrong dimensions or a
 * tensor the model has no place for are errors naming the file and tensor. Multi-token-prediction layers
 * ({@code blk.<block_count>.*}) are skipped.
 *
 * <pre>{@code
 * try (NDManager manager = NDManager.newBaseManager()) {
 *     DeepSeekForCausalLM lm = GgufLoader.load(Path.of("model-q4_0.gguf"), manager, DataType.FLOAT32, true);
 * }
 * }</pre>
 */
public final class GgufLoader {

    private static final Logger LOG = LoggerFactory.getLogger(GgufLoader.class);
    private static final Pattern BLOCK = Pattern.compile("^blk\\.(\\d+)\\..*");

    private GgufLoader() {}

    /** Whether {@code path} is a GGUF file (by its magic). */
    public static boolean isGguf(Path path) {
        return GgufFile.isGguf(path);
    }

    /**
     * Loads a model with weights on {@code manager}.
     *
     * @param dtype FLOAT32 or FLOAT16, the type of the float weights and of the computation
     * @param nativeQuantized keep Q8_0/Q4_0 matrices quantized (see the class comment)
     * @throws GgufFormatException for a malformed file, another architecture, a missing, misshapen or unexpected
     *     tensor
     */
    public static DeepSeekForCausalLM load(Path file, NDManager manager, DataType dtype, boolean nativeQuantized)
            throws IOException {
        try (GgufFile f = GgufFile.open(file)) {
            return load(f, manager, dtype, nativeQuantized);
        }
    }

    /** Loads with each weight on its stage's manager of {@code placement} (decoder layers split over devices). */
    public static DeepSeekForCausalLM load(Path file, LayerPlacement placement, DataType dtype, boolean nativeQuantized)
            throws IOException {
        try (GgufFile f = GgufFile.open(file)) {
            return load(f, placement, dtype, nativeQuantized);
        }
    }

    /** Loads from an opened file. */
    public static DeepSeekForCausalLM load(GgufFile f, NDManager manager, DataType dtype, boolean nativeQuantized)
            throws IOException {
        return load(f, LayerPlacement.single(manager), dtype, nativeQuantized);
    }

    /** Loads from an opened file, each weight on its stage's manager of {@code placement}. */
    public static DeepSeekForCausalLM load(GgufFile f, LayerPlacement placement, DataType dtype,
            boolean nativeQuantized) throws IOException {
        DeepSeekConfig c = DeepSeek2Metadata.config(f);
        DeepSeekForCausalLM lm = new DeepSeekForCausalLM(c);
        Map<String, Parameter> params = BlockTrees.parameters(lm);
        Set<String> used = new HashSet<>();
        Map<String, Block> quantized = new LinkedHashMap<>();
        for (String hf : params.keySet()) {
            DeepSeek2Tensors.Source s = DeepSeek2Tensors.source(hf);
            if (s.kind() == DeepSeek2Tensors.Kind.KV_B) {
                if (!f.tensors().containsKey(s.gguf()) && f.tensors().containsKey(s.gguf().replace("_k_b", "_kv_b"))) {
                    used.add(s.gguf().replace("_k_b", "_kv_b")); // an old file with the unsplit tensor
                } else {
                    used.add(f.tensor(s.gguf()).name());
                    used.add(f.tensor(DeepSeek2Tensors.valueHalf(s.gguf())).name());
                }
                continue;
            }
            if (hf.endsWith("e_score_correction_bias") && !f.tensors().containsKey(s.gguf())) {
                continue; // zeros: a V3-style router without a correction bias
            }
            GgufTensorInfo t = f.tensor(s.gguf());
            used.add(t.name());
            Block owner = BlockTrees.get(lm, hf.substring(0, hf.lastIndexOf('.')));
            boolean matrix = owner instanceof Linear || owner instanceof TokenEmbedding;
            if (nativeQuantized && matrix && t.type().isQuantized()) {
                quantized.put(hf, owner);
            }
        }
        checkUnexpected(f, used, c);
        try {
            lm.initializeWith(placement, dtype, hf -> new FromGguf(f, c, hf, quantized.containsKey(hf)));
        } catch (UncheckedIOException e) {
            lm.getParameters().forEach(p -> p.getValue().close());
            throw e.getCause();
        } catch (RuntimeException e) {
            lm.getParameters().forEach(p -> p.getValue().close());
            throw e;
        }
        for (String hf : quantized.keySet()) {
            NDManager stage = params.get(hf).getArray().getManager(); // the placeholder's: its stage's manager
            params.get(hf).close(); // the 1-element placeholder
            QuantizedTensor q = readQuantized(f, hf, stage);
            String path = hf.substring(0, hf.lastIndexOf('.'));
            if (quantized.get(hf) instanceof TokenEmbedding) {
                BlockTrees.replace(lm, path, old -> QuantizedEmbedding.of(q, dtype, "weight"));
            } else {
                BlockTrees.replace(lm, path, old -> QuantizedLinear.of(q, null, dtype, QuantMethod.RTN));
            }
        }
        return lm;
    }

    private static void checkUnexpected(GgufFile f, Set<String> used, DeepSeekConfig c) throws GgufFormatException {
        Set<String> unexpected = new TreeSet<>();
        int mtp = 0;
        for (String name : f.tensors().keySet()) {
            if (used.contains(name)) {
                continue;
            }
            Matcher m = BLOCK.matcher(name);
            if (m.matches() && Integer.parseInt(m.group(1)) >= c.numHiddenLayers()) {
                mtp++;
            } else if (!name.equals("output.weight") || !c.tieWordEmbeddings()) {
                unexpected.add(name);
            }
        }
        if (!unexpected.isEmpty()) {
            throw new GgufFormatException(f.path() + ": tensors a deepseek2 model of this config has no place for: "
                    + unexpected);
        }
        if (mtp > 0) {
            LOG.info("{}: skipping {} multi-token-prediction tensors (blk.{}.* and later)", f.path(), mtp,
                    c.numHiddenLayers());
        }
    }

    /** The quantized tensor of a Q8_0/Q4_0 matrix or of one expert's slice of a stacked one. */
    private static QuantizedTensor readQuantized(GgufFile f, String hf, NDManager manager) throws IOException {
        DeepSeek2Tensors.Source s = DeepSeek2Tensors.source(hf);
        GgufTensorInfo t = f.tensor(s.gguf());
        long[] ne = t.ne();
        long in = ne[0];
        long out = ne[1];
        long bytes = t.type().rowBytes(in) * out;
        long from = s.kind() == DeepSeek2Tensors.Kind.EXPERT ? s.expert() * bytes : 0;
        ByteBuffer blocks = f.bytes(t, from, bytes);
        return GgufBlocks.toQuantized(t.type(), blocks, out, in, manager);
    }

    /** Reads one parameter from the file when DJL allocates it, after checking the dimensions. */
    private static final class FromGguf implements Initializer {
        private final GgufFile f;
        private final DeepSeekConfig c;
        private final String hf;
        private final boolean placeholder;

        FromGguf(GgufFile f, DeepSeekConfig c, String hf, boolean placeholder) {
            this.f = f;
            this.c = c;
            this.hf = hf;
            this.placeholder = placeholder;
        }

        @Override
        public NDArray initialize(NDManager manager, Shape shape, DataType dataType) {
            try {
                float[] values = placeholder ? null : read(shape);
                if (placeholder) {
                    check(shape);
                    return manager.zeros(new Shape(1), dataType);
                }
                NDArray a = OwnedArrays.of(manager, values, shape);
                if (dataType == DataType.FLOAT32) {
                    return a;
                }
                NDArray cast = a.toType(dataType, false);
                a.close();
                return cast;
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        }

        private void check(Shape shape) throws IOException {
            DeepSeek2Tensors.Source s = DeepSeek2Tensors.source(hf);
            GgufTensorInfo t = f.tensor(s.gguf());
            long[] dims = shape.getShape();
            long[] expected = s.kind() == DeepSeek2Tensors.Kind.EXPERT
                    ? new long[] {dims[1], dims[0], c.nRoutedExperts()} : DeepSeek2Tensors.reverse(dims);
            expect(t, expected);
        }

        private float[] read(Shape shape) throws IOException {
            DeepSeek2Tensors.Source s = DeepSeek2Tensors.source(hf);
            long n = shape.size();
            switch (s.kind()) {
                case DIRECT: {
                    if (!f.tensors().containsKey(s.gguf()) && hf.endsWith("e_score_correction_bias")) {
                        return new float[(int) n];
                    }
                    check(shape);
                    return f.readFloats(f.tensor(s.gguf()), 0, n);
                }
                case EXPERT: {
                    check(shape);
                    return f.readFloats(f.tensor(s.gguf()), s.expert() * n, n);
                }
                case KV_B:
                    return kvB(s.gguf(), shape);
                default:
                    throw new IllegalStateException(s.kind().toString());
            }
        }

        /** kv_b_proj (heads * (nope + v), rank) from attn_k_b (transposed per head) and attn_v_b. */
        private float[] kvB(String kbName, Shape shape) throws IOException {
            String legacy = kbName.replace("_k_b", "_kv_b");
            if (!f.tensors().containsKey(kbName) && f.tensors().containsKey(legacy)) {
                GgufTensorInfo t = f.tensor(legacy);
                expect(t, DeepSeek2Tensors.reverse(shape.getShape()));
                return f.readFloats(t, 0, shape.size());
            }
            GgufTensorInfo kb = f.tensor(kbName);
            GgufTensorInfo vb = f.tensor(DeepSeek2Tensors.valueHalf(kbName));
            long[][] dims = DeepSeek2Tensors.kvBDims(c);
            expect(kb, dims[0]);
            expect(vb, dims[1]);
            return DeepSeek2Tensors.joinKvB(f.readFloats(kb, 0, kb.numel()), f.readFloats(vb, 0, vb.numel()), c);
        }

        private void expect(GgufTensorInfo t, long[] ne) throws GgufFormatException {
            if (!Arrays.equals(t.ne(), ne)) {
                throw new GgufFormatException(f.path() + ": tensor '" + t.name() + "' has dimensions "
                        + Arrays.toString(t.ne()) + ", the model (" + hf + ") expects " + Arrays.toString(ne));
            }
        }
    }
}
