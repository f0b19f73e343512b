package ai.djl.memopt.lora;

import ai.djl.memopt.nn.LinearWeightSource;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Activation;
import ai.djl.nn.Block;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import java.util.ArrayList;
import java.util.List;

/** Small block trees for the LoRA tests. */
final class ToyBlocks {

    private ToyBlocks() {}

    /** Linear(in -> hidden, bias) - relu - Linear(hidden -> out, no bias): paths "0", "1", "2". */
    static SequentialBlock mlp(NDManager m, long in, long hidden, long out, DataType type) {
        SequentialBlock seq = new SequentialBlock()
                .add(Linear.builder().setUnits(hidden).optBias(true).build())
                .add(Activation::relu)
                .add(Linear.builder().setUnits(out).optBias(false).build());
        seq.initialize(m, type, new Shape(1, in));
        return seq;
    }

    /**
     * A named container whose forward runs its children in order (each a projection or another container), standing
     * in for hand-written model blocks that call children through fields.
     */
    static final class Node extends AbstractBlock {
        private final List<Block> order = new ArrayList<>();

        Node add(String name, Block child) {
            order.add(addChildBlock(name, child));
            return this;
        }

        @Override
        protected NDList forwardInternal(ParameterStore ps, NDList in, boolean training, PairList<String, Object> p) {
            NDList x = in;
            // children are re-read from the children list, where BlockTrees.replaceChild puts decorators
            for (Block b : getChildren().values()) {
                x = b.forward(ps, x, training, p);
            }
            return x;
        }

        @Override
        public Shape[] getOutputShapes(Shape[] inputShapes) {
            Shape[] s = inputShapes;
            for (Block b : getChildren().values()) {
                s = b.getOutputShapes(s);
            }
            return s;
        }

        @Override
        protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
            Shape[] s = inputShapes;
            for (Block b : getChildren().values()) {
                b.initialize(manager, dataType, s);
                s = b.getOutputShapes(s);
            }
        }
    }

    static Linear linear(NDManager m, long in, long out, DataType type) {
        Linear l = Linear.builder().setUnits(out).optBias(false).build();
        l.initialize(m, type, new Shape(in));
        return l;
    }

    /**
     * The attention projections of a tiny DeepSeek-V3 (hidden 64, q_lora_rank 32, kv_lora_rank 16, 4 heads with
     * qk_head_dim 24 and v_head_dim 16, rope dim 8) under {@code model.layers.<i>.self_attn}, plus a dense MLP, an
     * MoE with routed experts in the last layer, and {@code lm_head}. Only the structure and shapes matter.
     */
    static Node deepSeekLike(NDManager m, int layers) {
        DataType f = DataType.FLOAT32;
        Node layerList = new Node();
        for (int i = 0; i < layers; i++) {
            Node attn = new Node()
                    .add("q_a_proj", linear(m, 64, 32, f))
                    .add("q_b_proj", linear(m, 32, 96, f))
                    .add("kv_a_proj_with_mqa", linear(m, 64, 24, f))
                    .add("kv_b_proj", linear(m, 16, 128, f))
                    .add("o_proj", linear(m, 64, 64, f));
            Node mlp = new Node();
            if (i < layers - 1) {
                mlp.add("gate_proj", linear(m, 64, 128, f)).add("up_proj", linear(m, 64, 128, f))
                        .add("down_proj", linear(m, 128, 64, f));
            } else {
                Node experts = new Node();
                for (int e = 0; e < 2; e++) {
                    experts.add(Integer.toString(e), new Node().add("gate_proj", linear(m, 64, 32, f))
                            .add("up_proj", linear(m, 64, 32, f)).add("down_proj", linear(m, 32, 64, f)));
                }
                mlp.add("experts", experts).add("shared_experts", new Node().add("gate_proj", linear(m, 64, 32, f))
                        .add("up_proj", linear(m, 64, 32, f)).add("down_proj", linear(m, 32, 64, f)));
            }
            layerList.add(Integer.toString(i), new Node().add("self_attn", attn).add("mlp", mlp));
        }
        return new Node().add("model", new Node().add("layers", layerList)).add("lm_head", linear(m, 64, 512, f));
    }

    /**
     * A stand-in for a quantized projection: int8 weights with one absmax scale per output row, dequantized on the
     * fly. It is what the QLoRA path wraps: not a Linear, only a {@link LinearWeightSource}.
     */
    static final class Int8Linear extends AbstractBlock implements LinearWeightSource {
        private final NDArray q; // (out, in) INT8
        private final NDArray scales; // (out, 1) FLOAT32
        private final NDArray bias; // (out) or null
        boolean released;

        Int8Linear(Linear source, NDArray bias) {
            this.bias = bias;
            NDArray w = source.getParameters().get("weight").getArray(); // (out, in)
            NDManager m = w.getManager();
            scales = w.abs().max(new int[] {1}, true).div(127f); // (out, 1)
            q = w.div(scales).round().toType(DataType.INT8, false);
            q.attach(m);
            scales.attach(m);
        }

        @Override
        public NDArray weight(NDManager manager) {
            NDArray w = q.toType(DataType.FLOAT32, false).mul(scales); // (out, in)
            w.attach(manager);
            return w;
        }

        @Override
        protected NDList forwardInternal(ParameterStore ps, NDList in, boolean training, PairList<String, Object> p) {
            NDArray x = in.singletonOrThrow();
            try (NDManager scope = x.getManager().newSubManager()) {
                NDArray w = weight(scope);
                NDArray y = Linear.linear(x, w, bias).singletonOrThrow();
                y.attach(x.getManager());
                return new NDList(y);
            }
        }

        @Override
        public Shape[] getOutputShapes(Shape[] inputShapes) {
            Shape s = inputShapes[0];
            return new Shape[] {s.slice(0, s.dimension() - 1).add(q.getShape().get(0))};
        }

        @Override
        public void clear() {
            q.close();
            scales.close();
            released = true;
        }
    }
}
