package ai.djl.memopt.model.deepseek;

import ai.djl.Device;
import ai.djl.memopt.nn.Blocks;
import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.training.ParameterStore;
import ai.djl.training.initializer.Initializer;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;
import java.util.Map;
import java.util.SplittableRandom;
import java.util.function.Function;
import java.util.stream.IntStream;

/**
 * DeepSeek-V3/V2 causal language model (Hugging Face {@code DeepseekV3ForCausalLM}/{@code DeepseekV2ForCausalLM}):
 * children {@code model} ({@link DeepSeekModel}) and {@code lm_head} (a bias-free {@code Linear}; absent when
 * {@code tie_word_embeddings}, the logits then use {@code model.embed_tokens.weight}). {@code Blocks.parameters(model)}
 * keys equal the checkpoint tensor names.
 *
 * <p>Shapes: {@code input_ids (B, T)} INT64 [, {@code attention_mask (B, T)} 1 keep / 0 padding] -> {@code logits (B, T,
 * vocab)} FP32. Weights may be FP32 or FP16 (norms, router, softmax and logits in FP32).
 *
 * <pre>{@code
 * try (NDManager manager = NDManager.newBaseManager(Device.cpu())) {
 *     DeepSeekForCausalLM lm = DeepSeekForCausalLM.random(DeepSeekConfig.preset("bench-tiny"), 42, manager,
 *             DataType.FLOAT32);
 *     ParameterStore ps = new ParameterStore(manager, false);
 *     NDArray logits = lm.forward(ps, new NDList(inputIds), false).head();   // (B, T, V)
 * }
 * }</pre>
 */
public final class DeepSeekForCausalLM extends AbstractBlock implements AutoCloseable {

    private static final byte VERSION = 1;

    private final DeepSeekConfig config;
    private final DeepSeekModel model;
    private Block lmHead;
    private NDManager manager;
    private boolean ownsManager;
    private DataType initializedType;

    /** An uninitialised model; use {@link #random}, {@link DeepSeekLoader#load} or {@link #initializeWith}. */
    public DeepSeekForCausalLM(DeepSeekConfig config) {
        super(VERSION);
        this.config = Preconditions.checkNotNull(config, "config");
        model = addChildBlock("model", new DeepSeekModel(config));
        if (!config.tieWordEmbeddings()) {
            lmHead = addChildBlock("lm_head", Projections.linear(config.vocabSize()));
        }
    }

    /**
     * A model with Hugging Face-style random weights ({@code N(0, initializer_range)} for projections, embeddings and
     * router, ones for norms, zeros for the correction bias), deterministic for a given seed (values are drawn in Java
     * per tensor name, independent of device and engine).
     */
    public static DeepSeekForCausalLM random(DeepSeekConfig config, long seed, NDManager manager, DataType dtype) {
        checkDType(dtype);
        DeepSeekForCausalLM lm = new DeepSeekForCausalLM(config);
        float std = (float) config.initializerRange();
        lm.initializeWith(manager, dtype, name -> {
            if (name.endsWith("layernorm.weight") || name.endsWith("norm.weight")) {
                return Initializer.ONES;
            }
            if (name.endsWith("e_score_correction_bias")) {
                return Initializer.ZEROS;
            }
            return new SeededNormal(seed, name, std);
        });
        return lm;
    }

    /**
     * {@link #random(DeepSeekConfig, long, NDManager, DataType)} with the weights in a new manager on {@code device},
     * owned by the model ({@link #close()} frees them).
     */
    public static DeepSeekForCausalLM random(DeepSeekConfig config, long seed, Device device, DataType dtype) {
        checkDType(dtype);
        NDManager owned = NDManager.newBaseManager(device);
        try {
            DeepSeekForCausalLM lm = random(config, seed, owned, dtype);
            lm.ownManager();
            return lm;
        } catch (RuntimeException e) {
            owned.close();
            throw e;
        }
    }

    static void checkDType(DataType dtype) {
        if (dtype == DataType.BFLOAT16) {
            throw new IllegalArgumentException(
                    "BF16 weights are not supported by DJL's PyTorch engine here (it aborts the JVM); use FLOAT32 or "
                            + "FLOAT16 (BF16 checkpoints are converted on load)");
        }
        Preconditions.checkArgument(dtype == DataType.FLOAT32 || dtype == DataType.FLOAT16,
                "model dtype must be FLOAT32 or FLOAT16, got %s", dtype);
    }

    /**
     * Gives every parameter its initializer by dotted name, then allocates them on {@code manager}.
     *
     * @param init the initializer of each parameter, by Hugging Face name
     */
    public void initializeWith(NDManager manager, DataType dtype, Function<String, Initializer> init) {
        checkDType(dtype);
        for (Map.Entry<String, Parameter> e : Blocks.parameters(this).entrySet()) {
            e.getValue().setInitializer(init.apply(e.getKey()));
        }
        initialize(manager, dtype, new Shape(1, 1));
        // weights live as long as their manager, even when loaded inside a caller's NDScope
        for (Parameter p : Blocks.parameters(this).values()) {
            NDScope.unregister(p.getArray());
        }
        this.manager = manager;
    }

    /**
     * Hands the model its manager: {@link #close()} then frees the weights. For loaders outside this package that
     * allocate a manager for the model they return, as {@link DeepSeekLoader#load(java.nio.file.Path, Device, DataType)} does.
     */
    public void ownManager() {
        ownsManager = true;
    }

    /** The manager the weights were allocated on (create inputs in it or a sub-manager of it). */
    public NDManager manager() {
        return manager;
    }

    /** Frees the weights if this model owns its manager (loaded or created with a {@code Device}); else a no-op. */
    @Override
    public void close() {
        if (ownsManager && manager != null) {
            manager.close();
        }
    }

    public DeepSeekConfig config() {
        return config;
    }

    /** The decoder stack. */
    public DeepSeekModel model() {
        return model;
    }

    /** The output projection, or null when the embeddings are tied. */
    public Block lmHead() {
        return lmHead;
    }

    /** The data type of the weights (the embedding table's, or the one initialized with once it was quantized). */
    public DataType dataType() {
        Parameter table = model.tokenEmbedding().weight();
        // a quantized embedding (QuantizedEmbedding) frees the float table
        return table.isInitialized() || initializedType == null ? table.getArray().getDataType() : initializedType;
    }

    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        initializedType = dataType;
        model.initialize(manager, dataType, new Shape(1, 1));
        if (lmHead != null) {
            Projections.init(lmHead, manager, dataType, config.hiddenSize());
        }
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        return Scoped.run(() -> {
            NDArray hidden = model.forward(ps, inputs, training).head(); // (B, T, H)
            return new NDList(logits(ps, hidden, training));
        });
    }

    /** {@code lm_head} (or the tied embedding) applied to final hidden states {@code (B, T, H)}; FP32 {@code (B, T, V)}. */
    public NDArray logits(ParameterStore ps, NDArray hidden, boolean training) {
        return Scoped.run(() -> {
            NDArray out;
            if (lmHead != null) {
                out = Projections.call(lmHead, ps, hidden, training);
            } else {
                NDArray table = ps.getValue(model.tokenEmbedding().weight(), hidden.getDevice(),
                        training);
                out = hidden.matMul(table.transpose()); // (B, T, V)
            }
            // TypeCasts.cast, not toType: DJL runs toType without autograd, which would cut an FP16 training graph
            return new NDList(TypeCasts.cast(out, DataType.FLOAT32));
        }).head();
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return new Shape[] {inputShapes[0].add(config.vocabSize())};
    }

    /** {@code N(0, std)} values drawn in Java from a per-tensor stream (seed, name). */
    static final class SeededNormal implements Initializer {
        private static final int CHUNK = 1 << 20;
        private final long seed;
        private final String name;
        private final float std;

        SeededNormal(long seed, String name, float std) {
            this.seed = seed;
            this.name = name;
            this.std = std;
        }

        @Override
        public NDArray initialize(NDManager manager, Shape shape, DataType dataType) {
            long n = shape.size();
            Preconditions.checkArgument(n <= Integer.MAX_VALUE, "tensor %s too large for random init: %s", name, shape);
            float[] values = new float[(int) n];
            long base = seed * 0x9E3779B97F4A7C15L ^ name.hashCode();
            int chunks = (int) ((n + CHUNK - 1) / CHUNK);
            // fixed-size chunks with their own streams: the values do not depend on the number of threads
            IntStream.range(0, chunks).parallel().forEach(c -> {
                SplittableRandom random = new SplittableRandom(base + 0xBF58476D1CE4E5B9L * (c + 1));
                int end = (int) Math.min(n, (long) (c + 1) * CHUNK);
                for (int i = c * CHUNK; i < end; i++) {
                    values[i] = (float) random.nextGaussian() * std;
                }
            });
            NDArray created = manager.create(values, shape);
            if (dataType == DataType.FLOAT32) {
                return created;
            }
            try (NDArray tmp = created) {
                return tmp.toType(dataType, false);
            }
        }
    }
}
