package ai.djl.memopt.finetune;

import ai.djl.memopt.checkpoint.CheckpointBlock;
import ai.djl.memopt.checkpoint.SegmentListener;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.nn.Block;
import ai.djl.nn.Parameter;
import com.google.common.base.Strings;
import java.util.ArrayList;
import java.util.Collections;
import java.util.IdentityHashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * The trainable parameters of a {@link FusedUpdate} sorted by when their gradients are complete: those only one
 * checkpointed block uses (complete after that block's backward), shared (tied) ones (complete after the whole
 * backward), and loose ones outside every checkpointed block (layers left plain).
 */
final class FusedGroups {

    /** The head's parameters, complete after the loss's own backward. */
    static final List<String> HEAD = List.of("lm_head.weight", "model.norm.weight");
    /** The embedding and the head: their gradient buffers are managed by the step (see {@link FusedUpdate#run}). */
    static final List<String> CREATED = List.of("model.embed_tokens.weight", "lm_head.weight");

    private final Map<String, Parameter> trainable = new LinkedHashMap<>();
    private final Map<Parameter, String> names = new IdentityHashMap<>();
    private final Set<Parameter> shared = Collections.newSetFromMap(new IdentityHashMap<>());
    /** Trainable, outside every checkpointed block, not in the head nor given a buffer: layers left plain. */
    private final List<String> loose = new ArrayList<>();
    private final Map<Block, List<String>> byBlock = new IdentityHashMap<>();

    FusedGroups(DeepSeekForCausalLM lm, Map<String, Parameter> parameters) {
        Map<Parameter, Integer> uses = new IdentityHashMap<>();
        for (Parameter p : BlockTrees.parameters(lm).values()) {
            uses.merge(p, 1, Integer::sum);
        }
        if (lm.lmHead() == null) { // tied: the head reads the embedding table, which appears once in the tree
            uses.merge(lm.model().tokenEmbedding().weight(), 1, Integer::sum);
        }
        Set<Parameter> checkpointed = Collections.newSetFromMap(new IdentityHashMap<>());
        for (Block b : BlockTrees.walk(lm).values()) {
            if (isCheckpointed(b)) {
                checkpointed.addAll(BlockTrees.parameters(b).values());
            }
        }
        for (Map.Entry<String, Parameter> e : parameters.entrySet()) {
            Parameter p = e.getValue();
            if (p.requiresGradient()) {
                trainable.put(e.getKey(), p);
                names.put(p, e.getKey());
                if (uses.getOrDefault(p, 1) > 1) {
                    shared.add(p); // tied: its gradient is complete only after the whole backward
                } else if (!checkpointed.contains(p) && !CREATED.contains(e.getKey())
                        && !HEAD.contains(e.getKey())) {
                    loose.add(e.getKey());
                }
            }
        }
    }

    private static boolean isCheckpointed(Block b) {
        for (Block d = b; ; d = ((BlockDecorator) d).delegate()) {
            if (d instanceof CheckpointBlock) {
                return true;
            }
            if (!(d instanceof BlockDecorator)) {
                return false;
            }
        }
    }

    /** The trainable parameter {@code name}, or null. */
    Parameter get(String name) {
        return trainable.get(name);
    }

    /** The trainable parameters' names, in the model's order. */
    Set<String> names() {
        return trainable.keySet();
    }

    boolean isShared(Parameter p) {
        return shared.contains(p);
    }

    /** Whether some parameter is shared (tied embeddings). */
    boolean anyShared() {
        return !shared.isEmpty();
    }

    /** Trainable parameters outside every checkpointed block (not the head's, the embedding's). */
    List<String> loose() {
        return loose;
    }

    /** The trainable, unshared parameters of {@code block}: complete once its backward is done. */
    List<String> exclusive(Block block) {
        return byBlock.computeIfAbsent(block, b -> {
            List<String> out = new ArrayList<>();
            for (Parameter p : BlockTrees.parameters(b).values()) {
                String name = names.get(p);
                if (name != null && !shared.contains(p) && !out.contains(name)) {
                    out.add(name);
                }
            }
            return out;
        });
    }

    /** A group's name for messages: the common prefix of its parameters' names, or the segment's name. */
    static String label(SegmentListener.Event e, List<String> group) {
        String prefix = group.isEmpty() ? "" : group.get(0);
        for (String name : group) {
            prefix = Strings.commonPrefix(prefix, name);
        }
        int dot = prefix.lastIndexOf('.');
        String block = "checkpointed block '" + e.name() + "'";
        return dot > 0 ? prefix.substring(0, dot) + " (" + block + ")" : block;
    }
}
