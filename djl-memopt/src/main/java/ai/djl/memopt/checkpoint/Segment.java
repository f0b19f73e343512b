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
 * starts from, the earlier segments' output leaves it reads, and the fingerprint that checks the recomputation.
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
    /** Its inputs that are leaves requiring grad: earlier segments' output leaves or the caller's (not owned). */
    final NDList inputLeaves;

    Segment(String name, List<Block> blocks, ParameterStore parameterStore, NDList inputs,
            PairList<String, Object> params, NDList outputs, Fingerprint fingerprint, boolean inputHasGraph,
            NDList inputLeaves) {
        this.name = name;
        this.blocks = blocks;
        this.parameterStore = parameterStore;
        this.inputs = inputs;
        this.params = params;
        this.outputs = outputs;
        this.fingerprint = fingerprint;
        this.inputHasGraph = inputHasGraph;
        this.inputLeaves = inputLeaves;
    }

    /** Frees the segment's own handles (its input aliases and output leaves). */
    void close() {
        inputs.forEach(NDArray::close);
        outputs.forEach(NDArray::close);
    }
}
