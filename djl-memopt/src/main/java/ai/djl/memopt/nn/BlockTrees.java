package ai.djl.memopt.nn;

import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Block;
import ai.djl.nn.BlockList;
import ai.djl.nn.ParallelBlock;
import ai.djl.nn.Parameter;
import ai.djl.nn.SequentialBlock;
import ai.djl.util.Pair;
import ai.djl.util.PairList;
import com.google.common.base.Preconditions;
import java.lang.reflect.Field;
import java.lang.reflect.Modifier;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.function.Function;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Locale;
import java.util.Set;

/**
 * Utilities over a DJL block tree, addressed by Hugging Face-style dotted paths.
 *
 * <p>Named {@code BlockTrees} rather than {@code Blocks} so that it never clashes with DJL's {@code ai.djl.nn.Blocks}, which
 * most DJL code imports.
 *
 * <p>DJL's {@link AbstractBlock#getChildren()} names each child {@code "%02d" + name} ({@code 01embed_tokens}); the
 * paths here strip that prefix, so the DeepSeek model's parameters read exactly as the tensors of a Hugging Face
 * checkpoint ({@code model.layers.0.self_attn.q_a_proj.weight}).
 *
 * <p>Decorators (checkpointing, mixed precision, quantization, LoRA) wrap blocks of a model the user already built:
 * {@link #replaceChild} swaps a child in place, both in the parent's children list (which {@code SequentialBlock} and
 * friends iterate in {@code forward}) and in every field of the parent that held the old child (which hand-written
 * blocks call directly).
 *
 * <pre>{@code
 * BlockTrees.replace(model, "model.layers.0.self_attn.q_a_proj", linear -> new MyDecorator(linear));
 * }</pre>
 *
 * <p>A {@link BlockDecorator} is transparent here: paths, children and parameters below it are those of the block it
 * wraps. {@link #sites} sees through {@link BlockAdapter}s as well: it is the traversal every pass uses, and
 * {@link #replace} changes the block inside the wrappers, so that decorators compose in any order.
 */
public final class BlockTrees {

    private static final Field CHILDREN_FIELD;

    static {
        try {
            CHILDREN_FIELD = AbstractBlock.class.getDeclaredField("children");
            CHILDREN_FIELD.setAccessible(true);
        } catch (NoSuchFieldException e) {
            throw new ExceptionInInitializerError(e);
        }
    }

    private BlockTrees() {}

    /**
     * The names of a block's direct children, in order, as paths use them: DJL's {@code "%02d"} ordering prefix removed
     * ({@code "01q_a_proj"} -> {@code "q_a_proj"}). Children of a {@code SequentialBlock} or {@code ParallelBlock}
     * (which DJL names after their class), and siblings that would share a name, are named by position ({@code "0"},
     * {@code "1"}, ...) as in PyTorch's {@code nn.Sequential}.
     */
    public static List<String> childNames(Block block) {
        block = BlockDecorator.unwrap(block);
        List<String> names = new ArrayList<>();
        int i = 0;
        for (Pair<String, Block> child : block.getChildren()) {
            String prefix = String.format(Locale.ROOT, "%02d", i + 1);
            String key = child.getKey();
            names.add(key.startsWith(prefix) && key.length() > prefix.length() ? key.substring(prefix.length()) : key);
            i++;
        }
        Set<String> unique = new HashSet<>(names);
        if (unique.size() != names.size() || block instanceof SequentialBlock || block instanceof ParallelBlock) {
            for (int j = 0; j < names.size(); j++) {
                names.set(j, Integer.toString(j));
            }
        }
        return names;
    }

    /**
     * Every block of the tree in depth-first pre-order, keyed by its dotted path ({@code ""} is the root).
     *
     * @param root the root block
     * @return an unmodifiable, ordered map of path to block
     */
    public static Map<String, Block> walk(Block root) {
        Map<String, Block> out = new LinkedHashMap<>();
        walk(root, "", out);
        return Collections.unmodifiableMap(out);
    }

    private static void walk(Block block, String path, Map<String, Block> out) {
        out.put(path, block);
        List<String> names = childNames(block);
        List<Block> children = BlockDecorator.unwrap(block).getChildren().values();
        for (int i = 0; i < names.size(); i++) {
            walk(children.get(i), join(path, names.get(i)), out);
        }
    }

    /**
     * Every parameter of the tree keyed by its dotted path ({@code model.layers.0.mlp.gate_proj.weight}).
     *
     * @param root the root block
     * @return an unmodifiable, ordered map of path to parameter
     */
    public static Map<String, Parameter> parameters(Block root) {
        Map<String, Parameter> out = new LinkedHashMap<>();
        for (Map.Entry<String, Block> e : walk(root).entrySet()) {
            for (Pair<String, Parameter> p : BlockDecorator.unwrap(e.getValue()).getDirectParameters()) {
                out.put(join(e.getKey(), p.getKey()), p.getValue());
            }
        }
        return Collections.unmodifiableMap(out);
    }

    /**
     * Finds the block at a dotted path.
     *
     * @throws IllegalArgumentException naming the first path element that does not exist
     */
    public static Block get(Block root, String path) {
        Block current = root;
        if (path.isEmpty()) {
            return current;
        }
        StringBuilder seen = new StringBuilder();
        for (String part : path.split("\\.")) {
            int index = childNames(current).indexOf(part);
            Block next = index < 0 ? null : BlockDecorator.unwrap(current).getChildren().valueAt(index);
            if (next == null) {
                throw new IllegalArgumentException(
                        "No block '" + part + "' under '" + seen + "' (looking for '" + path + "'); children are "
                                + childNames(current));
            }
            if (seen.length() > 0) {
                seen.append('.');
            }
            seen.append(part);
            current = next;
        }
        return current;
    }

    /**
     * Every place of the tree in depth-first pre-order, keyed by its dotted path, with the block that computes there
     * seen through the decorators and adapters around it ({@link BlockSite}). The passes (quantize, prune, LoRA, mixed
     * precision, checkpointing) walk this, so a decorator applied first never hides a layer from a later pass. The
     * inside of an adapter is its base, at the adapter's own path (PEFT's module view).
     *
     * @param root the root block
     * @return an unmodifiable, ordered map of path to site
     */
    public static Map<String, BlockSite> sites(Block root) {
        Map<String, BlockSite> out = new LinkedHashMap<>();
        visit(BlockSite.of("", null, null, root, List.of()), out);
        return Collections.unmodifiableMap(out);
    }

    private static void visit(BlockSite site, Map<String, BlockSite> out) {
        out.put(site.path(), site);
        Block core = site.core();
        List<String> names = childNames(core);
        List<Block> children = core.getChildren().values();
        List<Block> above = site.wrappersAbove();
        for (int i = 0; i < names.size(); i++) {
            visit(BlockSite.of(join(site.path(), names.get(i)), core, names.get(i), children.get(i), above), out);
        }
    }

    /**
     * The site at a dotted path: a module path as {@link #sites} gives it, or a structural one that names an adapter's
     * own child ({@code lm_head.base_layer}).
     *
     * @throws IllegalArgumentException naming the first path element that does not exist
     */
    public static BlockSite site(Block root, String path) {
        BlockSite site = BlockSite.of("", null, null, root, List.of());
        if (path.isEmpty()) {
            return site;
        }
        for (String part : path.split("\\.")) {
            Block holder = site.core();
            int index = childNames(holder).indexOf(part);
            for (int w = site.wrappers().size() - 1; index < 0 && w >= 0; w--) {
                Block wrapper = site.wrappers().get(w);
                if (wrapper instanceof BlockAdapter) {
                    holder = wrapper;
                    index = childNames(holder).indexOf(part);
                }
            }
            if (index < 0) {
                throw new IllegalArgumentException("No block '" + part + "' under '" + site.path() + "' (looking for '"
                        + path + "'); children are " + childNames(site.core()));
            }
            site = BlockSite.of(join(site.path(), part), holder, part, holder.getChildren().valueAt(index),
                    site.wrappersAbove());
        }
        return site;
    }

    /**
     * Replaces the block that computes at {@code path} by {@code wrap.apply(old)}: below the decorators and adapters
     * there, which stay and keep wrapping it (see {@link BlockSite#replaceCore}). Without any, that is the block the
     * parent holds.
     *
     * @return the replacement
     */
    public static Block replace(Block root, String path, Function<Block, Block> wrap) {
        Preconditions.checkArgument(!path.isEmpty(), "cannot replace the root block itself");
        return site(root, path).replaceCore(wrap);
    }

    /**
     * The classes of {@code blocks} with their counts, most frequent first ({@code "3 Linear, 2 LambdaBlock"}): what a
     * filter that matched nothing saw.
     */
    public static String describeTypes(Iterable<? extends Block> blocks) {
        Map<String, Integer> counts = new LinkedHashMap<>();
        for (Block b : blocks) {
            counts.merge(b.getClass().getSimpleName(), 1, Integer::sum);
        }
        StringBuilder out = new StringBuilder();
        counts.entrySet().stream()
                .sorted((a, b) -> a.getValue().equals(b.getValue()) ? a.getKey().compareTo(b.getKey())
                        : b.getValue() - a.getValue())
                .forEach(e -> out.append(out.length() == 0 ? "" : ", ").append(e.getValue()).append(' ')
                        .append(e.getKey()));
        return out.length() == 0 ? "no blocks" : out.toString();
    }

    /**
     * Replaces the direct child {@code name} of {@code parent}, keeping its position (and so its DJL key and saved form).
     *
     * @throws IllegalArgumentException if the parent is not an {@link AbstractBlock} or has no such child
     */
    public static void replaceChild(Block parent, String name, Block replacement) {
        Preconditions.checkNotNull(replacement, "replacement");
        parent = BlockDecorator.unwrap(parent);
        Preconditions.checkArgument(
                parent instanceof AbstractBlock,
                "cannot replace children of %s: only AbstractBlock subclasses keep a replaceable children list",
                parent.getClass().getName());
        PairList<String, Block> children = childrenOf((AbstractBlock) parent);
        int index = childNames(parent).indexOf(name);
        Preconditions.checkArgument(
                index >= 0, "%s has no child '%s'; children are %s", parent.getClass().getSimpleName(), name,
                childNames(parent));
        String key = children.keyAt(index);
        Block old = children.valueAt(index);
        children.remove(index);
        children.add(index, key, replacement);
        replaceFieldReferences(parent, old, replacement);
    }

    /**
     * Replaces the child {@code old} (by identity) of {@code parent} itself, a decorator or adapter included, in its
     * children list and its fields.
     */
    static void replaceChildBlock(Block parent, Block old, Block replacement) {
        Preconditions.checkArgument(parent instanceof AbstractBlock,
                "cannot replace children of %s: only AbstractBlock subclasses keep a replaceable children list",
                parent.getClass().getName());
        PairList<String, Block> children = childrenOf((AbstractBlock) parent);
        int index = -1;
        for (int i = 0; i < children.size() && index < 0; i++) {
            index = children.valueAt(i) == old ? i : -1;
        }
        Preconditions.checkArgument(index >= 0, "%s does not hold %s", parent.getClass().getSimpleName(), old);
        String key = children.keyAt(index);
        children.remove(index);
        children.add(index, key, Preconditions.checkNotNull(replacement, "replacement"));
        replaceFieldReferences(parent, old, replacement);
    }

    private static void replaceFieldReferences(Block parent, Block old, Block replacement) {
        for (Class<?> c = parent.getClass(); c != null && c != AbstractBlock.class; c = c.getSuperclass()) {
            for (Field f : c.getDeclaredFields()) {
                if (Modifier.isStatic(f.getModifiers()) || !Block.class.isAssignableFrom(f.getType())) {
                    continue;
                }
                try {
                    f.setAccessible(true);
                    if (f.get(parent) == old) {
                        if (Modifier.isFinal(f.getModifiers()) && !f.getType().isInstance(replacement)) {
                            // a final field of the concrete type keeps the original on purpose (DeepSeekModel's
                            // tokenEmbedding: "the table created with the model, even if decorated")
                            continue;
                        }
                        Preconditions.checkArgument(
                                f.getType().isInstance(replacement),
                                "%s.%s has type %s and cannot hold a %s: declare the field as Block to allow decorators",
                                c.getSimpleName(), f.getName(), f.getType().getSimpleName(),
                                replacement.getClass().getSimpleName());
                        f.set(parent, replacement);
                    }
                } catch (IllegalAccessException | RuntimeException e) {
                    if (e instanceof IllegalArgumentException) {
                        throw (IllegalArgumentException) e;
                    }
                    throw new IllegalStateException(
                            "cannot update field " + c.getName() + "." + f.getName() + " to the replacement block", e);
                }
            }
        }
    }

    @SuppressWarnings("unchecked")
    private static PairList<String, Block> childrenOf(AbstractBlock parent) {
        try {
            return (BlockList) CHILDREN_FIELD.get(parent);
        } catch (IllegalAccessException e) {
            throw new IllegalStateException("cannot read AbstractBlock.children", e);
        }
    }

    private static String join(String path, String name) {
        return path.isEmpty() ? name : path + "." + name;
    }
}
