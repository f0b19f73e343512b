package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.NDScope;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import com.google.common.base.Preconditions;

/**
 * Decoding without a cache: every step runs the block over the whole sequence so far. Works with any block that
 * follows the causal-LM contract {@code NDList(input_ids (B, T) INT64, attention_mask (B, T) INT64) -> NDList(logits
 * (B, T, V))}, optionally with {@code position_ids (B, T)} as a third input (DeepSeek's blocks take it, which makes
 * left-padded batches exact); otherwise the block derives positions itself. The reference the cached decoder is checked against,
 * and the fallback for models without a cache implementation. Cost grows quadratically with the length.
 *
 * <pre>{@code
 * LanguageModel lm = new RecomputingLanguageModel(block, vocabSize, Device.cpu());
 * }</pre>
 */
public final class RecomputingLanguageModel implements LanguageModel {

    private final Block block;
    private final int vocabSize;
    private final Device device;
    private final boolean passPositionIds;

    /** A model whose block takes {@code (input_ids, attention_mask)}. */
    public RecomputingLanguageModel(Block block, int vocabSize, Device device) {
        this(block, vocabSize, device, false);
    }

    /**
     * @param passPositionIds whether the block takes {@code position_ids} as a third input
     */
    public RecomputingLanguageModel(Block block, int vocabSize, Device device, boolean passPositionIds) {
        this.passPositionIds = passPositionIds;
        this.block = Preconditions.checkNotNull(block, "block");
        Preconditions.checkArgument(vocabSize > 0, "vocabSize must be > 0, got %s", vocabSize);
        this.vocabSize = vocabSize;
        this.device = Preconditions.checkNotNull(device, "device");
    }

    @Override
    public Device device() {
        return device;
    }

    @Override
    public int vocabSize() {
        return vocabSize;
    }

    /** Ids and positions, INT64, kept for the whole sequence. */
    @Override
    public long cacheBytesPerToken() {
        return 16;
    }

    /** Every step computes the logits of every position, in the block's type (at most FP32). */
    @Override
    public long stepLogitsBytes(int length) {
        return 4L * vocabSize * length;
    }

    @Override
    public DecodingSession newSession(NDManager manager, int batchSize, int maxLength) {
        return new Session(manager.newSubManager(device), batchSize, maxLength);
    }

    private final class Session implements DecodingSession {
        private final NDManager manager;
        private final NDArray ids; // (B, maxLength) INT64, preallocated
        private final NDArray positions; // (B, maxLength) INT64, preallocated
        private final int batch;
        private final int maxLength;
        private int length;

        Session(NDManager manager, int batch, int maxLength) {
            this.manager = manager;
            this.batch = batch;
            this.maxLength = maxLength;
            this.ids = manager.zeros(new Shape(batch, maxLength), DataType.INT64);
            this.positions = manager.zeros(new Shape(batch, maxLength), DataType.INT64);
        }

        @Override
        public NDArray next(NDArray inputIds, NDArray positionIds, NDArray attentionMask) {
            int t = (int) inputIds.getShape().get(1);
            Preconditions.checkArgument(inputIds.getShape().get(0) == batch, "batch %s != %s", inputIds.getShape(), batch);
            Preconditions.checkArgument(length + t <= maxLength, "session of %s tokens is full (%s + %s)", maxLength, length, t);
            Preconditions.checkArgument(
                    attentionMask.getShape().get(1) == length + t, "attention mask %s must cover %s tokens", attentionMask.getShape(), length + t);
            ids.set(new NDIndex(":, {}:{}", length, length + t), inputIds);
            positions.set(new NDIndex(":, {}:{}", length, length + t), positionIds);
            length += t;
            NDManager out = inputIds.getManager();
            NDArray prefix = ids.get(new NDIndex(":, :{}", length)); // (B, length)
            prefix.attach(out);
            NDList in = new NDList(prefix, attentionMask);
            if (passPositionIds) {
                NDArray pos = positions.get(new NDIndex(":, :{}", length)); // (B, length)
                pos.attach(out);
                in.add(pos);
            }
            NDArray last;
            // results of ops on weights land in the weights' manager: the scope frees every temporary of the step
            try (NDScope scope = new NDScope()) {
                scope.suppressNotUsedWarning();
                NDList result = block.forward(new ParameterStore(out, false), in, false);
                NDArray logits = result.singletonOrThrow(); // (B, length, V)
                last = logits.get(new NDIndex(":, -1, :")); // (B, V)
                if (last.getDataType() != DataType.FLOAT32) {
                    last = last.toType(DataType.FLOAT32, false);
                }
                NDScope.unregister(last);
            }
            last.attach(out);
            return last;
        }

        @Override
        public int length() {
            return length;
        }

        @Override
        public void close() {
            manager.close();
        }
    }
}
