package ai.djl.memopt.checkpoint;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.nn.Block;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import java.util.List;

/**
 * One checkpointed stretch of the forward as {@link CheckpointingGradientCollector} records it: the blocks, what they
 * need to run again (parameter store, input aliases, parameters), the output leaves whose gradients its backward
 * starts from, and the fingerprint that checks the recomputation.
 */
final class Segment {
    final String name;
    final List<Block> blocks;
    final ParameterStore parameterStore;
    final NDList inputs;
    final PairList<String, Object> params;
    final NDList outputs;
    final Fingerprint fingerprint;
    final boolean inputHasGraph;

    Segment(String name, List<Block> blocks, ParameterStore parameterStore, NDList inputs,
            PairList<String, Object> params, NDList outputs, Fingerprint fingerprint, boolean inputHasGraph) {
        this.name = name;
        this.blocks = blocks;
        this.parameterStore = parameterStore;
        this.inputs = inputs;
        this.params = params;
        this.outputs = outputs;
        this.fingerprint = fingerprint;
        this.inputHasGraph = inputHasGraph;
    }

    /** Frees the segment's own handles (its input aliases and output leaves). */
    void close() {
        inputs.forEach(NDArray::close);
        outputs.forEach(NDArray::close);
    }
}
