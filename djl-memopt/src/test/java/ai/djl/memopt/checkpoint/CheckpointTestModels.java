package ai.djl.memopt.checkpoint;

import ai.djl.memopt.nn.BlockTrees;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Activation;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.jni.JniUtils;
import ai.djl.training.GradientCollector;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.function.Supplier;

/** Small models for the checkpointing tests, and gradient bookkeeping. */
final class CheckpointTestModels {

    static final int WIDTH = 12;

    private CheckpointTestModels() {}

    /** Linear, Tanh, Linear, Tanh, ... , Linear(4): 9 children. */
    static SequentialBlock mlp() {
        SequentialBlock s = new SequentialBlock();
        for (int i = 0; i < 4; i++) {
            s.add(Linear.builder().setUnits(WIDTH).build()).add(Activation::tanh);
        }
        s.add(Linear.builder().setUnits(4).build());
        return s;
    }

    /** x -> x + layer_i(x) for each child; the residual additions are outside the children. */
    static final class ResidualStack extends AbstractBlock {
        ResidualStack(int depth) {
            super((byte) 1);
            for (int i = 0; i < depth; i++) {
                SequentialBlock layer = new SequentialBlock()
                        .add(Linear.builder().setUnits(WIDTH).build())
                        .add(Activation::tanh)
                        .add(Linear.builder().setUnits(WIDTH).build());
                addChildBlock(Integer.toString(i), layer);
            }
        }

        @Override
        protected NDList forwardInternal(ParameterStore ps, NDList inputs, boolean training,
                PairList<String, Object> params) {
            NDArray x = inputs.head();
            for (Block layer : getChildren().values()) {
                x = x.add(layer.forward(ps, new NDList(x), training).head()); // (B, W)
            }
            return new NDList(x);
        }

        @Override
        public Shape[] getOutputShapes(Shape[] inputShapes) {
            return inputShapes;
        }

        @Override
        protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
            for (Block b : getChildren().values()) {
                b.initialize(manager, dataType, inputShapes);
            }
        }
    }

    /**
     * y = left(h) * right(h) + shared(tanh(shared(h))) with h = stem(x): h (a non-leaf) is the input of three
     * segments, and {@code shared} is one block (one set of parameters) called twice.
     */
    static final class Branches extends AbstractBlock {
        Block stem;
        Block left;
        Block right;
        Block shared;

        Branches() {
            super((byte) 1);
            stem = addChildBlock("stem", Linear.builder().setUnits(WIDTH).build());
            left = addChildBlock("left", Linear.builder().setUnits(WIDTH).build());
            right = addChildBlock("right", Linear.builder().setUnits(WIDTH).build());
            shared = addChildBlock("shared", Linear.builder().setUnits(WIDTH).build());
        }

        @Override
        protected NDList forwardInternal(ParameterStore ps, NDList inputs, boolean training,
                PairList<String, Object> params) {
            NDArray h = stem.forward(ps, inputs, training).head();
            NDArray a = left.forward(ps, new NDList(h), training).head();
            NDArray b = right.forward(ps, new NDList(h), training).head();
            NDArray s1 = shared.forward(ps, new NDList(h), training).head().tanh();
            NDArray s2 = shared.forward(ps, new NDList(s1), training).head();
            return new NDList(a.mul(b).add(s2));
        }

        @Override
        public Shape[] getOutputShapes(Shape[] inputShapes) {
            return new Shape[] {new Shape(inputShapes[0].get(0), WIDTH)};
        }

        @Override
        protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
            Shape hidden = new Shape(inputShapes[0].get(0), WIDTH);
            stem.initialize(manager, dataType, inputShapes);
            left.initialize(manager, dataType, hidden);
            right.initialize(manager, dataType, hidden);
            shared.initialize(manager, dataType, hidden);
        }
    }

    /** Gradients of a run: every parameter by path, plus the input's (key "input") when it requires grad. */
    static Map<String, float[]> gradients(
            Block model, NDManager manager, NDArray x, NDArray weights, Supplier<GradientCollector> collector) {
        zeroGradients(model);
        try (NDManager step = manager.newSubManager()) {
            NDArray input = x.duplicate();
            input.attach(step);
            if (x.hasGradient()) {
                input.setRequiresGradient(true);
            }
            ParameterStore ps = new ParameterStore(step, false);
            try (GradientCollector gc = collector.get()) {
                NDArray out = model.forward(ps, new NDList(input), true).head();
                NDArray loss = out.mul(weights).mean().add(out.square().mean()); // scalar
                gc.backward(loss);
            }
            Map<String, float[]> grads = new LinkedHashMap<>();
            for (Map.Entry<String, Parameter> e : BlockTrees.parameters(model).entrySet()) {
                try (NDArray g = e.getValue().getArray().getGradient()) {
                    grads.put(e.getKey(), g.toFloatArray());
                }
            }
            if (x.hasGradient()) {
                grads.put("input", input.getGradient().toFloatArray());
            }
            return grads;
        }
    }

    static void zeroGradients(Block model) {
        for (Parameter p : model.getParameters().values()) {
            JniUtils.zeroGrad((PtNDArray) p.getArray());
        }
    }

    static double maxAbsDiff(Map<String, float[]> a, Map<String, float[]> b) {
        if (!a.keySet().equals(b.keySet())) {
            throw new AssertionError("gradient keys differ: " + a.keySet() + " vs " + b.keySet());
        }
        double max = 0;
        for (String k : a.keySet()) {
            float[] x = a.get(k);
            float[] y = b.get(k);
            if (x.length != y.length) {
                throw new AssertionError(k + ": lengths " + x.length + " vs " + y.length);
            }
            for (int i = 0; i < x.length; i++) {
                max = Math.max(max, Math.abs(x[i] - y[i]));
            }
        }
        return max;
    }

    static double maxAbs(Map<String, float[]> a) {
        double max = 0;
        for (float[] x : a.values()) {
            for (float v : x) {
                max = Math.max(max, Math.abs(v));
            }
        }
        return max;
    }
}
