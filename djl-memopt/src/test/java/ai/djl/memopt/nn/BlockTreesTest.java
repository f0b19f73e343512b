package ai.djl.memopt.nn;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Activation;
import ai.djl.nn.Block;
import ai.djl.nn.LambdaBlock;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;
import ai.djl.training.ParameterStore;
import ai.djl.util.PairList;
import java.util.List;
import org.junit.jupiter.api.Test;

class BlockTreesTest {

    /** A hand-written block that calls its child through a field, as the DeepSeek blocks do. */
    static final class Attn extends AbstractBlock {
        Block proj;

        Attn() {
            proj = addChildBlock("q_a_proj", Linear.builder().setUnits(4).optBias(false).build());
        }

        @Override
        protected NDList forwardInternal(ParameterStore ps, NDList in, boolean training, PairList<String, Object> p) {
            return proj.forward(ps, in, training, p);
        }

        @Override
        public Shape[] getOutputShapes(Shape[] inputShapes) {
            return proj.getOutputShapes(inputShapes);
        }

        @Override
        protected void initializeChildBlocks(NDManager manager, DataType dataType, Shape... inputShapes) {
            proj.initialize(manager, dataType, inputShapes);
        }
    }

    @Test
    void pathsStripDjlPrefixesAndNumberSameNamedSiblings() {
        SequentialBlock seq = new SequentialBlock()
                .add(Linear.builder().setUnits(8).build())
                .add(Activation::relu)
                .add(Linear.builder().setUnits(2).build());
        assertEquals(List.of("0", "1", "2"), BlockTrees.childNames(seq));
        SequentialBlock root = new SequentialBlock().add(new Attn());
        assertEquals(List.of("", "0", "0.q_a_proj"), List.copyOf(BlockTrees.walk(root).keySet()));
        try (NDManager m = NDManager.newBaseManager()) {
            seq.initialize(m, DataType.FLOAT32, new Shape(1, 3));
            assertEquals(List.of("0.weight", "0.bias", "2.weight", "2.bias"),
                    List.copyOf(BlockTrees.parameters(seq).keySet()));
        }
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> BlockTrees.get(root, "0.nope"));
        assertTrue(e.getMessage().contains("'nope'") && e.getMessage().contains("[q_a_proj]"), e.getMessage());
    }

    @Test
    void replaceWorksForSequentialChildrenAndForFields() {
        try (NDManager m = NDManager.newBaseManager()) {
            SequentialBlock seq = new SequentialBlock()
                    .add(Linear.builder().setUnits(3).optBias(false).build())
                    .add(Activation::relu);
            seq.initialize(m, DataType.FLOAT32, new Shape(2, 3));
            NDArray x = m.randomNormal(new Shape(2, 3));
            ParameterStore ps = new ParameterStore(m, false);
            NDArray before = seq.forward(ps, new NDList(x), false).singletonOrThrow();
            // negate after the Linear: the sequential's forward must now run the replacement
            Block replaced = BlockTrees.replace(seq, "0", old -> new SequentialBlock().add(old).add(a -> new NDList(a.singletonOrThrow().neg())));
            assertSame(replaced, seq.getChildren().valueAt(0));
            NDArray after = seq.forward(ps, new NDList(x), false).singletonOrThrow();
            NDArray lin = BlockTrees.get(seq, "0.0").forward(ps, new NDList(x), false).singletonOrThrow();
            assertArrayEquals(Activation.relu(lin.neg()).toFloatArray(), after.toFloatArray(), 0f);
            assertTrue(before.sub(Activation.relu(lin)).abs().max().getFloat() == 0f);

            Attn attn = new Attn();
            attn.initialize(m, DataType.FLOAT32, new Shape(2, 3));
            LambdaBlock zero = new LambdaBlock(list -> new NDList(list.singletonOrThrow().zerosLike()));
            BlockTrees.replaceChild(attn, "q_a_proj", zero);
            assertSame(zero, attn.proj, "the field the block calls was updated");
            assertArrayEquals(new float[6], attn.forward(ps, new NDList(x), false).singletonOrThrow().toFloatArray());
        }
    }
}
