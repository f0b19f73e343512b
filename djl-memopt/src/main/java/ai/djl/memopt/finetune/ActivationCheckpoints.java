package ai.djl.memopt.finetune;

import ai.djl.memopt.checkpoint.CheckpointPolicy;
import ai.djl.memopt.checkpoint.Checkpointing;
import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekMoE;
import ai.djl.memopt.nn.BlockDecorator;
import ai.djl.memopt.nn.BlockTrees;
import com.google.common.base.Preconditions;
import java.util.List;
import java.util.Locale;

/**
 * Activation checkpointing of a model being fine-tuned, by spec: {@code none}, {@code all}, {@code nested},
 * {@code nested+experts}, {@code every:N} or {@code sqrt} (see {@link FineTuner#checkpointPolicy}).
 */
final class ActivationCheckpoints {

    /** The two halves of a decoder layer, which {@code nested} checkpointing recomputes one at a time. */
    private static final CheckpointPolicy SUBLAYERS =
            CheckpointPolicy.matching((name, block) -> name.equals("self_attn") || name.equals("mlp"));

    /**
     * What to checkpoint: the decoder layers {@code policy} picks (none if null), inside each its attention and MLP
     * ({@code sublayers}) and the routed experts of an MoE MLP ({@code experts}); {@code name} is recorded.
     */
    record Spec(CheckpointPolicy policy, String name, boolean sublayers, boolean experts) {
        static final Spec NONE = new Spec(null, "none", false, false);

        Spec {
            name = policy == null ? "none" : name != null ? name : "custom";
        }

        /** The spec of a name ({@code none}, {@code all}, {@code nested}, ...; see {@link #policy(String)}). */
        static Spec parse(String spec) {
            String s = spec.trim().toLowerCase(Locale.ROOT);
            return new Spec(ActivationCheckpoints.policy(s), s, s.startsWith("nested"), s.equals("nested+experts"));
        }
    }

    private ActivationCheckpoints() {}

    /**
     * A checkpoint policy for the decoder layers by name: {@code none} (null), {@code all}, {@code every:N} (layers 0,
     * N, 2N, ...) or {@code sqrt}. The decoder layers take rotary tables and the mask besides the hidden state, so they
     * are not a sequential chain and Chen et al.'s multi-layer segments cannot be formed; {@code sqrt} checkpoints
     * every {@code ceil(sqrt(L))}-th layer instead (about {@code sqrt(L)} checkpointed layers). {@code nested} and
     * {@code nested+experts} are {@code all} for the layers; {@link FineTuner.Builder#optCheckpointing(String)} then
     * also checkpoints each layer's {@code self_attn} and {@code mlp} inside it, and with {@code +experts} every routed
     * expert inside an MoE {@code mlp}, so that during a layer's backward these are recomputed and back-propagated one
     * at a time: only one half's (one expert's) saved activations exist at once, for one more forward of each. Each
     * expert's backward also passes through the MoE's token gather and the norm before it, which makes
     * {@code +experts} slower (bench-small in FP16: about 11 s a step against 9.5 s for {@code nested} and 8 s for
     * {@code all}).
     *
     * @throws IllegalArgumentException naming the bad value
     */
    static CheckpointPolicy policy(String spec) {
        String s = spec.trim().toLowerCase(Locale.ROOT);
        if (s.equals("none")) {
            return null;
        }
        if (s.equals("all") || s.equals("nested") || s.equals("nested+experts")) {
            return CheckpointPolicy.all();
        }
        if (s.equals("sqrt")) {
            return (names, children) -> CheckpointPolicy.everyNth(
                    Math.max(1, (int) Math.ceil(Math.sqrt(children.size())))).plan(names, children);
        }
        if (s.startsWith("every:")) {
            int n;
            try {
                n = Integer.parseInt(s.substring("every:".length()));
            } catch (NumberFormatException e) {
                throw new IllegalArgumentException("bad checkpoint spec '" + spec + "': every:N needs an integer N");
            }
            Preconditions.checkArgument(n >= 1, "bad checkpoint spec '%s': N must be >= 1", spec);
            return CheckpointPolicy.everyNth(n);
        }
        throw new IllegalArgumentException(
                "unknown checkpoint spec '" + spec + "': expected none, all, nested, nested+experts, every:N or sqrt");
    }

    /**
     * Checkpoints the decoder layers of {@code lm} as {@code spec} says.
     *
     * @return the names of the checkpointed decoder layers
     */
    static List<String> apply(DeepSeekForCausalLM lm, Spec spec) {
        if (spec.policy() == null) {
            return List.of();
        }
        List<String> layers = Checkpointing.wrapChildren(BlockTrees.get(lm, "model.layers"), spec.policy());
        for (String layer : layers) {
            String path = "model.layers." + layer;
            if (spec.sublayers()) {
                Checkpointing.wrapChildren(BlockTrees.get(lm, path), SUBLAYERS);
            }
            if (spec.experts() && BlockDecorator.unwrap(BlockTrees.get(lm, path + ".mlp")) instanceof DeepSeekMoE) {
                Checkpointing.wrapChildren(BlockTrees.get(lm, path + ".mlp.experts"), CheckpointPolicy.all());
            }
        }
        return layers;
    }
}
