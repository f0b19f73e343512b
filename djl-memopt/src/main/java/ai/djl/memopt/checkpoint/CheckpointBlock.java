package ai.djl.memopt.checkpoint;

import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Activation checkpointing for any DJL block: in a training forward the wrapped block runs with autograd off and its
 * intermediate activations are freed at once; only its input and its output are kept. During backward,
 * {@link CheckpointingGradientCollector} recomputes the block with autograd on and back-propagates the gradient that
 * arrived at the output into it (a vector-Jacobian product), which fills the gradients of the block's parameters and
 * its input.
 *
 * <p>Shapes and types are those of the wrapped block: {@code (B, T, H) -> (B, T, H)} for a decoder layer.
 *
 * <pre>{@code
 * Checkpointing.wrapChildren(BlockTrees.get(model, "model.layers"), CheckpointPolicy.all());
 * try (Trainer trainer = new CheckpointingTrainer(model, config)) {  // or CheckpointingGradientCollector.open(..)
 *     EasyTrain.trainBatch(trainer, batch);
 *     trainer.step();
 * }
 * }</pre>
 *
 * <p><b>Paths.</b> The wrapped block is registered as the only child (named {@code checkpointed}), so DJL's own
 * initialisation, {@code getParameters()} and {@code saveParameters} reach it; the block is a {@link BlockDecorator},
 * which makes {@link ai.djl.memopt.nn.BlockTrees} transparent to it: {@code BlockTrees.parameters(model)} keeps the Hugging
 * Face names ({@code model.layers.0.mlp.gate_proj.weight}) and {@code BlockTrees.replace} below it edits the wrapped block.
 *
 * <p><b>When it checkpoints.</b> Only in a training forward on the PyTorch engine, with autograd recording on this
 * thread and a {@link CheckpointingGradientCollector} open (it drives the recomputation). Otherwise (inference,
 * evaluation, another engine, DJL's plain gradient collector) it just forwards: gradients stay correct, only the
 * memory saving is lost, which is logged once per block for the plain-collector case.
 *
 * <p><b>Requirements on the wrapped block.</b> Deterministic in training mode (dropout is not: see
 * {@link Builder#optVerifyDeterminism}); no long-lived arrays created inside {@code forward} (temporaries are closed
 * by an {@link ai.djl.ndarray.NDScope} at once); running statistics (BatchNorm) are updated twice, as in PyTorch's
 * {@code torch.utils.checkpoint}.
 *
 * <p><b>Nesting.</b> Checkpoint blocks may sit inside a checkpointed block: each is then recomputed on its own during
 * the outer block's backward (see {@link CheckpointingGradientCollector}), so the outer recomputation keeps only what
 * lies between them:
 *
 * <pre>{@code
 * for (String layer : Checkpointing.wrapChildren(model, "model.layers", CheckpointPolicy.all())) {
 *     Checkpointing.wrapChildren(model, "model.layers." + layer,
 *             CheckpointPolicy.matching((name, block) -> name.equals("self_attn") || name.equals("mlp")));
 * }
 * }</pre>
 */
public final class CheckpointBlock extends AbstractBlock implements BlockDecorator {

    private static final byte VERSION = 1;
    private static final Logger logger = LoggerFactory.getLogger(CheckpointBlock.class);

    private final Block block;
    private final String name;
    private final boolean verifyDeterminism;
    private final Span span;
    private final int spanIndex;
    private volatile boolean warnedNoCollector;

    private CheckpointBlock(Block block, String name, boolean verifyDeterminism, Span span, int spanIndex) {
        super(VERSION);
        this.block = addChildBlock("checkpointed", block);
        this.name = name;
        this.verifyDeterminism = verifyDeterminism;
        this.span = span;
        this.spanIndex = spanIndex;
        if (span != null) {
            span.set(spanIndex, this);
        }
        if (block.isInitialized()) {
            inputShapes = block.getInputShapes();
        }
    }

    /** Wraps a block with default options (name = class name, no determinism check). */
    public static CheckpointBlock wrap(Block block) {
        return builder().setBlock(block).build();
    }

    /** A builder for a {@link CheckpointBlock}. */
    public static Builder builder() {
        return new Builder();
    }

    /** Part of a run of consecutive children checkpointed as one segment (sqrt(n) schedule). */
    static CheckpointBlock spanMember(Block block, String name, boolean verify, Span span, int index) {
        return new CheckpointBlock(block, name, verify, span, index);
    }

    /** {@inheritDoc} */
    @Override
    public Block delegate() {
        return block;
    }

    /** The name used in messages (the block's path when wrapped by {@link Checkpointing#wrapChildren}). */
    public String getName() {
        return name;
    }

    /** Whether recomputation is checked against a fingerprint of the forward output. */
    public boolean isVerifyDeterminism() {
        return verifyDeterminism;
    }

    Span span() {
        return span;
    }

    int spanIndex() {
        return spanIndex;
    }

    /** {@inheritDoc} */
    @Override
    protected NDList forwardInternal(
            ParameterStore parameterStore, NDList inputs, boolean training, PairList<String, Object> params) {
        if (!training || inputs.isEmpty() || !(inputs.head() instanceof PtNDArray) || !JniUtils.isGradMode()) {
            return block.forward(parameterStore, inputs, training, params);
        }
        CheckpointingGradientCollector collector = CheckpointingGradientCollector.active();
        if (collector == null) {
            if (!warnedNoCollector) {
                warnedNoCollector = true;
                logger.warn(
                        "CheckpointBlock '{}' ran a training forward without a CheckpointingGradientCollector: it"
                                + " forwards plainly and saves no memory. Use CheckpointingTrainer or"
                                + " CheckpointingGradientCollector.open(...).",
                        name);
            }
            return block.forward(parameterStore, inputs, training, params);
        }
        return collector.forward(this, parameterStore, inputs, params);
    }

    /** {@inheritDoc} */
    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        return block.getOutputShapes(inputShapes);
    }

    /** {@inheritDoc} */
    @Override
    public boolean isInitialized() {
        return block.isInitialized();
    }

    /** {@inheritDoc} */
    @Override
    protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
        block.initialize(manager, dataType, inputShapes);
    }

    /** {@inheritDoc} */
    @Override
    public String toString() {
        return "Checkpoint(" + name + ": " + block + ")";
    }

    /** Builder: {@code setBlock} required. */
    public static final class Builder {
        private Block block;
        private String name;
        private boolean verifyDeterminism;

        private Builder() {}

        /** The block to checkpoint. */
        public Builder setBlock(Block block) {
            this.block = block;
            return this;
        }

        /** A name for messages, e.g. the block's path ({@code model.layers.3}). */
        public Builder optName(String name) {
            this.name = name;
            return this;
        }

        /**
         * Compares the recomputed output with a fingerprint of the forward output (sum, absolute sum and 8 values per
         * output, so a few scalars are kept) and throws {@link NonDeterministicRecomputationException} naming the
         * block on a mismatch. Costs a few small reductions per segment.
         */
        public Builder optVerifyDeterminism(boolean verify) {
            this.verifyDeterminism = verify;
            return this;
        }

        /** Builds the decorator. */
        public CheckpointBlock build() {
            Preconditions.checkArgument(block != null, "CheckpointBlock needs a block: call setBlock");
            if (block instanceof CheckpointBlock) {
                throw new IllegalArgumentException(
                        "block '" + ((CheckpointBlock) block).getName() + "' is already checkpointed");
            }
            String n = name != null ? name : block.getClass().getSimpleName();
            return new CheckpointBlock(block, n, verifyDeterminism, null, 0);
        }
    }
}
