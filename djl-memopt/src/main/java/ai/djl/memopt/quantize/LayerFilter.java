package ai.djl.memopt.quantize;

import ai.djl.nn.Block;
import java.util.Optional;

/**
 * Decides which {@link ai.djl.nn.core.Linear} layers a quantization or pruning pass touches. Only Linear layers are
 * ever offered to a filter; embedding tables are opted in with {@link QuantizationConfig#includeEmbeddings()} or a
 * {@link LayerOverride}; everything else (norms, custom blocks) keeps its precision.
 */
@FunctionalInterface
public interface LayerFilter {

    /**
     * Why the Linear at {@code path} must stay as it is, or empty to quantize it.
     *
     * @param path the dotted block path ({@code model.layers.0.mlp.gate_proj})
     */
    Optional<String> skipReason(String path, Block linear);

    /** Every Linear layer. */
    static LayerFilter all() {
        return (path, block) -> Optional.empty();
    }

    /** {@link #defaults(boolean)} without {@code lm_head}. */
    static LayerFilter defaults() {
        return defaults(false);
    }

    /**
     * The default for decoder LLMs such as DeepSeek: every Linear (attention projections, dense MLP, shared and routed
     * experts) except
     *
     * <ul>
     *   <li>a MoE router named {@code gate} (in DeepSeek it is not a Linear, but guarded by name anyway): routing takes
     *       a discrete top-k of its logits, so a small weight error flips which experts run, and the layer is tiny;
     *   <li>{@code lm_head} unless {@code includeLmHead}: its error lands directly on the logits, and for small
     *       vocabularies-to-hidden ratios it is a large share of the output error.
     * </ul>
     *
     * Embeddings and norms are not Linear layers, so a filter never sees them. Norm weights are tiny vectors that scale
     * every activation and are never quantized. Embedding tables stay in full precision by default (a lookup saves no
     * matmul, only memory); {@link QuantizationConfig#includeEmbeddings()} or a {@link LayerOverride} naming them
     * quantizes them ({@link QuantizedEmbedding}).
     */
    static LayerFilter defaults(boolean includeLmHead) {
        return (path, block) -> {
            String name = path.substring(path.lastIndexOf('.') + 1);
            if (name.equals("gate")) {
                return Optional.of("MoE router: top-k routing is discrete, quantization error would flip experts");
            }
            if (name.equals("lm_head") && !includeLmHead) {
                return Optional.of("lm_head: error lands on the logits directly (include it explicitly)");
            }
            return Optional.empty();
        };
    }
}
