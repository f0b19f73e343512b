package ai.djl.memopt.examples.wrap;

import ai.djl.ndarray.NDList;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Activation;
import ai.djl.nn.Block;
import ai.djl.nn.ParallelBlock;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.convolutional.Conv2d;
import ai.djl.nn.core.Linear;
import ai.djl.nn.norm.BatchNorm;
import ai.djl.nn.pooling.Pool;
import java.util.Arrays;

/**
 * "A user's existing DJL model": the two architectures of {@code ai.djl:basicmodelzoo} the examples wrap, written with
 * plain {@code ai.djl:api} blocks exactly as basicmodelzoo 0.36 builds them ({@code ai.djl:basicmodelzoo} is not served
 * by the package registry this project builds against, so it cannot be a dependency; the blocks are the same DJL
 * classes, so everything shown here applies unchanged to {@code new Mlp(...)} and {@code ResNetV1.builder()...}).
 *
 * <ul>
 *   <li>{@link #mlp}: {@code ai.djl.basicmodelzoo.basic.Mlp}: flatten, then {@code Linear(h) + ReLU} per hidden
 *       size, then {@code Linear(out)}. Input {@code (B, C, H, W)} -> logits {@code (B, out)}.
 *   <li>{@link #resNet}: {@code ai.djl.basicmodelzoo.cv.classification.ResNetV1} for small images (a 3x3 stem, no
 *       max-pool): stem {@code conv3x3 -> BN -> ReLU}, then residual units {@code ParallelBlock(conv-BN-ReLU-conv-BN,
 *       shortcut)} summed and ReLU'd, then global average pooling and {@code Linear(out)}. Input {@code (B, C, H, W)}
 *       -> logits {@code (B, out)}.
 * </ul>
 */
public final class UserModels {

    private UserModels() {}

    /** {@code basicmodelzoo.basic.Mlp(input, output, hidden)}: its children are the top-level layers. */
    public static SequentialBlock mlp(int input, int output, int... hidden) {
        SequentialBlock block = new SequentialBlock();
        block.add(ai.djl.nn.Blocks.batchFlattenBlock(input)); // (B, C, H, W) -> (B, input)
        for (int units : hidden) {
            block.add(Linear.builder().setUnits(units).build()).add(Activation::relu);
        }
        block.add(Linear.builder().setUnits(output).build()); // (B, output)
        return block;
    }

    /**
     * A ResNetV1 for small images: {@code stages[i]} residual units of {@code filters[i]} channels, the first unit of
     * each stage after the first with stride 2 and a 1x1 projection shortcut.
     */
    public static SequentialBlock resNet(int output, int[] stages, int[] filters) {
        SequentialBlock block = new SequentialBlock();
        block.add(Conv2d.builder().setFilters(filters[0]).setKernelShape(new Shape(3, 3)).optPadding(new Shape(1, 1))
                        .optBias(false).build())
                .add(BatchNorm.builder().build())
                .add(Activation::relu);
        for (int s = 0; s < stages.length; s++) {
            for (int u = 0; u < stages[s]; u++) {
                boolean down = s > 0 && u == 0;
                block.add(residualUnit(filters[s], down ? 2 : 1, down));
            }
        }
        block.add(Pool.globalAvgPool2dBlock()) // (B, C)
                .add(Linear.builder().setUnits(output).build()); // (B, output)
        return block;
    }

    /** A small CIFAR-style ResNet: two stages of two units, 16 and 32 channels. */
    public static SequentialBlock smallResNet(int output) {
        return resNet(output, new int[] {2, 2}, new int[] {16, 32});
    }

    private static Block residualUnit(int filters, int stride, boolean project) {
        Shape s = new Shape(stride, stride);
        SequentialBlock residual = new SequentialBlock()
                .add(Conv2d.builder().setFilters(filters).setKernelShape(new Shape(3, 3)).optStride(s)
                        .optPadding(new Shape(1, 1)).optBias(false).build())
                .add(BatchNorm.builder().build())
                .add(Activation::relu)
                .add(Conv2d.builder().setFilters(filters).setKernelShape(new Shape(3, 3)).optPadding(new Shape(1, 1))
                        .optBias(false).build())
                .add(BatchNorm.builder().build());
        SequentialBlock shortcut = new SequentialBlock();
        if (project) {
            shortcut.add(Conv2d.builder().setFilters(filters).setKernelShape(new Shape(1, 1)).optStride(s)
                            .optBias(false).build())
                    .add(BatchNorm.builder().build());
        } else {
            shortcut.add(ai.djl.nn.Blocks.identityBlock());
        }
        return new SequentialBlock()
                .add(new ParallelBlock(
                        list -> new NDList(list.get(0).singletonOrThrow().add(list.get(1).singletonOrThrow())),
                        Arrays.asList(residual, shortcut)))
                .add(Activation::relu);
    }
}
