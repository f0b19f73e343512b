package ai.djl.memopt.nn;

import ai.djl.ndarray.NDArray;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.List;
import java.util.Optional;
import java.util.function.Function;

/**
 * One place of a block tree as the passes (quantize, prune, LoRA, mixed precision, checkpointing) see it: its dotted
 * path, the block that computes there ({@link #core()}), and the {@link BlockDecorator}s and {@link BlockAdapter}s
 * stacked around it, outermost first ({@link #wrappers()}). A checkpointed, LoRA-adapted, quantized projection at
 * {@code lm_head} is one site: wrappers {@code [CheckpointBlock, LoraLinear]}, core {@code QuantizedLinear}.
 *
 * <p>Passes decide on the core and change it with {@link #replaceCore}, which keeps the wrappers where they are and
 * tells every decorator above ({@link BlockDecorator#blocksReplaced}); they read and edit weight values through
 * {@link #value} and {@link #valueChanged}, which go to the master copy a {@link MasterWeights} decorator above keeps.
 * So any two decorators give the same model in either order, or one of them refuses, naming the conflict.
 *
 * <pre>{@code
 * for (BlockSite site : BlockTrees.sites(model).values()) {
 *     if (site.core() instanceof Linear) {
 *         site.replaceCore(linear -> new MyQuantizedLinear((Linear) linear));
 *     }
 * }
 * }</pre>
 */
public final class BlockSite {

    private final String path;
    private final Block holder;
    private final String name;
    private final Block outer;
    private final List<Block> wrappers;
    private final Block core;
    private final List<Block> above;

    private BlockSite(String path, Block holder, String name, Block outer, List<Block> wrappers, Block core,
            List<Block> above) {
        this.path = path;
        this.holder = holder;
        this.name = name;
        this.outer = outer;
        this.wrappers = wrappers;
        this.core = core;
        this.above = above;
    }

    /**
     * The site of {@code outer}, held by {@code holder} as child {@code name} (null for the root), below the wrappers
     * {@code above} of its ancestors.
     */
    static BlockSite of(String path, Block holder, String name, Block outer, List<Block> above) {
        ImmutableList.Builder<Block> wrappers = ImmutableList.builder();
        Block core = outer;
        while (true) {
            if (core instanceof BlockDecorator) {
                wrappers.add(core);
                core = ((BlockDecorator) core).delegate();
            } else if (core instanceof BlockAdapter) {
                wrappers.add(core);
                core = ((BlockAdapter) core).base();
            } else {
                break;
            }
        }
        return new BlockSite(path, holder, name, outer, wrappers.build(), core, ImmutableList.copyOf(above));
    }

    /** The dotted path ({@code ""} for the root). */
    public String path() {
        return path;
    }

    /** The block its parent holds: the outermost wrapper, or the core itself. */
    public Block outer() {
        return outer;
    }

    /** The decorators and adapters around the core, outermost first (empty if none). */
    public List<Block> wrappers() {
        return wrappers;
    }

    /** The block that computes here: neither a {@link BlockDecorator} nor a {@link BlockAdapter}. */
    public Block core() {
        return core;
    }

    /** The first wrapper of the given type, outermost first. */
    public <T> Optional<T> wrapper(Class<T> type) {
        return wrappers.stream().filter(type::isInstance).map(type::cast).findFirst();
    }

    /** Every wrapper from the root down to this core: the ancestors' ones, then this site's. */
    public List<Block> wrappersAbove() {
        return ImmutableList.<Block>builder().addAll(above).addAll(wrappers).build();
    }

    /**
     * The array that holds {@code parameter}'s value: the master copy of a {@link MasterWeights} decorator above (an
     * FP32 master behind an FP16 working copy), else the parameter's own array. Edit it in place, then call
     * {@link #valueChanged}.
     */
    public NDArray value(Parameter parameter) {
        for (Block b : wrappersAbove()) {
            if (b instanceof MasterWeights) {
                NDArray master = ((MasterWeights) b).masterOf(parameter);
                if (master != null) {
                    return master;
                }
            }
        }
        return parameter.getArray();
    }

    /** After {@link #value} of {@code parameter} was changed in place: every copy of it follows. */
    public void valueChanged(Parameter parameter) {
        for (Block b : wrappersAbove()) {
            if (b instanceof MasterWeights && ((MasterWeights) b).masterOf(parameter) != null) {
                ((MasterWeights) b).masterChanged(parameter);
            }
        }
    }

    /**
     * Replaces the core by {@code replace.apply(core)}, inside the wrappers, which stay; then tells every decorator
     * above ({@link BlockDecorator#blocksReplaced}).
     *
     * @return the replacement
     * @throws IllegalArgumentException for the root's core when nothing wraps it
     */
    public Block replaceCore(Function<Block, Block> replace) {
        Block replacement = Preconditions.checkNotNull(replace.apply(core), "replacement of %s", path);
        Block coreHolder = wrappers.isEmpty() ? holder : wrappers.get(wrappers.size() - 1);
        put(coreHolder, core, replacement);
        notifyDecorators();
        return replacement;
    }

    /**
     * Puts {@code replacement} where {@code wrapper} (one of {@link #wrappers()}) is, dropping it and keeping what is
     * around it: removing a LoRA adapter ({@code replacement} its base) or replacing it by a merged layer. Then tells
     * every decorator above.
     *
     * @throws IllegalArgumentException if {@code wrapper} is not one of this site's wrappers
     */
    public void replaceWrapper(Block wrapper, Block replacement) {
        int i = wrappers.indexOf(wrapper);
        Preconditions.checkArgument(i >= 0, "%s is not a wrapper at '%s' (wrappers: %s)",
                wrapper.getClass().getSimpleName(), path, wrappers);
        put(i == 0 ? holder : wrappers.get(i - 1), wrapper, replacement);
        notifyDecorators();
    }

    private void put(Block into, Block old, Block replacement) {
        Preconditions.checkArgument(into != null, "cannot replace the root block itself");
        if (into == holder && old == outer) {
            BlockTrees.replaceChild(holder, name, replacement);
        } else {
            BlockTrees.replaceChildBlock(into, old, replacement);
        }
    }

    private void notifyDecorators() {
        for (Block b : wrappersAbove()) {
            if (b instanceof BlockDecorator) {
                ((BlockDecorator) b).blocksReplaced();
            }
        }
    }

    @Override
    public String toString() {
        return "'" + path + "': " + (wrappers.isEmpty() ? "" : wrappers + " around ") + core.getClass().getSimpleName();
    }
}
