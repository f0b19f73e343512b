package ai.djl.memopt.checkpoint;

import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.BlockSite;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.nn.Block;
import ai.djl.nn.SequentialBlock;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import com.google.common.collect.Lists;
import java.util.ArrayList;
import java.util.List;

/**
 * Applies activation checkpointing to a model that is already built, in place.
 *
 * <pre>{@code
 * // every decoder layer of the DeepSeek model
 * Checkpointing.wrapChildren(BlockTrees.get(model, "model.layers"), CheckpointPolicy.all());
 * // Chen et al.'s sqrt(n) schedule on a user's SequentialBlock
 * Checkpointing.wrapChildren(mlp, CheckpointPolicy.sqrtN());
 * }</pre>
 */
public final class Checkpointing {

    private Checkpointing() {}

    /** As {@link #wrapChildren(Block, CheckpointPolicy, boolean)} without the determinism check. */
    public static List<String> wrapChildren(Block parent, CheckpointPolicy policy) {
        return wrapChildren(parent, policy, false);
    }

    /**
     * Replaces the children of {@code parent} chosen by {@code policy} with {@link CheckpointBlock}s (via
     * {@link BlockTrees#replaceChild}, so the parent's forward, its children list and any field holding a child all see
     * the decorator; parameter paths do not change).
     *
     * @param parent the block whose children are checkpointed ({@code SequentialBlock}, a decoder-layer list...)
     * @param policy which children
     * @param verifyDeterminism check each recomputation against a fingerprint of the forward output
     * @return the names of the wrapped children, in order
     * @throws IllegalArgumentException if the policy matches no child (the message names the children's types), its
     *     plan is malformed, a child is already checkpointed, or a multi-child segment is planned for a parent that is
     *     not a {@link SequentialBlock}
     */
    public static List<String> wrapChildren(Block parent, CheckpointPolicy policy, boolean verifyDeterminism) {
        Preconditions.checkNotNull(parent, "parent");
        Preconditions.checkNotNull(policy, "policy");
        List<String> names = BlockTrees.childNames(parent);
        List<Block> children = BlockDecorator.unwrap(parent).getChildren().values();
        List<BlockSite> sites = new ArrayList<>();
        for (int i = 0; i < names.size(); i++) {
            sites.add(BlockTrees.site(parent, names.get(i)));
        }
        // the policy sees what computes (through decorators and adapters): a quantized or FP32-island child is matched
        // as what it is
        List<CheckpointPolicy.Range> plan = policy.plan(names, Lists.transform(sites, BlockSite::core));
        Preconditions.checkArgument(!plan.isEmpty(), "the checkpoint policy matches none of the %s children of %s"
                + " (children: %s)", names.size(), parent.getClass().getSimpleName(),
                BlockTrees.describeTypes(Lists.transform(sites, BlockSite::core)));
        int end = 0;
        for (CheckpointPolicy.Range r : plan) {
            Preconditions.checkArgument(
                    r.from() >= end && r.to() <= children.size(),
                    "checkpoint plan %s is not a list of increasing, non-overlapping ranges within the %s children"
                            + " of %s", plan, children.size(), parent.getClass().getSimpleName());
            end = r.to();
            if (r.size() > 1) {
                Preconditions.checkArgument(
                        BlockDecorator.unwrap(parent) instanceof SequentialBlock,
                        "checkpointing children %s of %s as one segment needs a SequentialBlock parent (each child's"
                                + " output must be the next child's input); use CheckpointPolicy.all() or everyNth",
                        r, parent.getClass().getSimpleName());
            }
            for (int i = r.from(); i < r.to(); i++) {
                Preconditions.checkArgument(
                        sites.get(i).wrapper(CheckpointBlock.class).isEmpty(), "child '%s' is already checkpointed",
                        names.get(i));
            }
        }
        ImmutableList.Builder<String> wrapped = ImmutableList.builder();
        for (CheckpointPolicy.Range r : plan) {
            if (r.size() == 1) {
                String name = names.get(r.from());
                Block child = children.get(r.from());
                BlockTrees.replaceChild(
                        parent, name,
                        CheckpointBlock.builder().setBlock(child).optName(name)
                                .optVerifyDeterminism(verifyDeterminism).build());
                wrapped.add(name);
            } else {
                Span span = new Span(names.get(r.from()) + ".." + names.get(r.to() - 1), r.size());
                List<Block> members = ImmutableList.copyOf(children.subList(r.from(), r.to()));
                for (int k = 0; k < members.size(); k++) {
                    String name = names.get(r.from() + k);
                    BlockTrees.replaceChild(
                            parent, name, CheckpointBlock.spanMember(members.get(k), name, verifyDeterminism, span, k));
                    wrapped.add(name);
                }
            }
        }
        return wrapped.build();
    }

    /** Wraps the children of the block at {@code path} under {@code root}; see {@link #wrapChildren}. */
    public static List<String> wrapChildren(Block root, String path, CheckpointPolicy policy) {
        return wrapChildren(BlockTrees.get(root, path), policy, false);
    }
}
