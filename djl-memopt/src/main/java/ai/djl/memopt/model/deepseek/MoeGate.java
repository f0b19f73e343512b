package ai.djl.memopt.model.deepseek;

import ai.djl.memopt.nn.Scalars;
import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.AbstractBlock;
import ai.djl.nn.Activation;
import ai.djl.nn.Parameter;
import ai.djl.training.ParameterStore;
import ai.djl.training.initializer.Initializer;
import ai.djl.util.PairList;

/**
 * The mixture-of-experts router, computed in FP32.
 *
 * <ul>
 *   <li>DeepSeek-V3 ({@code DeepseekV3TopkRouter}): {@code scores = sigmoid(x W^T)}; experts are chosen on
 *       {@code scores + e_score_correction_bias} (the bias only steers the choice): groups ranked by the sum of their
 *       top-2 scores, the best {@code topk_group} groups kept, then the top {@code num_experts_per_tok} experts; their
 *       weights are the unbiased scores, renormalised when {@code norm_topk_prob}, times {@code routed_scaling_factor}.
 *   <li>DeepSeek-V2: {@code scores = softmax(x W^T)}; {@code greedy} top-k, or {@code group_limited_greedy} (groups
 *       ranked by their best score); weights times {@code routed_scaling_factor} (renormalised first when
 *       {@code norm_topk_prob}, as DeepSeek's reference code does).
 * </ul>
 *
 * <p>Shapes: input {@code (N, hidden)} -> {@code topk_idx (N, k)} INT64 and {@code topk_weight (N, k)} FP32 (the
 * weights carry the gradient to {@code weight}). Parameters: {@code weight (n_routed_experts, hidden)}; V3 also the
 * buffer {@code e_score_correction_bias (n_routed_experts)} (loaded, never trained).
 */
public final class MoeGate extends AbstractBlock {

    private static final byte VERSION = 1;

    private final DeepSeekConfig config;
    private final int experts;
    private final int topK;
    private final Parameter weight;
    private final Parameter correctionBias;

    public MoeGate(DeepSeekConfig config) {
        super(VERSION);
        this.config = config;
        this.experts = config.nRoutedExperts();
        this.topK = config.numExpertsPerTok();
        weight = addParameter(Parameter.builder().setName("weight").setType(Parameter.Type.WEIGHT)
                .optShape(new Shape(experts, config.hiddenSize())).build());
        if (config.isV3()) {
            correctionBias = addParameter(Parameter.builder().setName("e_score_correction_bias")
                    .setType(Parameter.Type.OTHER).optInitializer(Initializer.ZEROS).optRequiresGrad(false)
                    .optShape(new Shape(experts)).build());
        } else {
            correctionBias = null;
        }
    }

    public Parameter weight() {
        return weight;
    }

    /** The V3 correction bias buffer, or null for V2. */
    public Parameter correctionBias() {
        return correctionBias;
    }

    @Override
    protected NDList forwardInternal(
            ParameterStore ps, NDList inputs, boolean training, PairList<String, Object> params) {
        NDArray x = inputs.head();
        return Scoped.run(() -> {
            NDArray w = TypeCasts.cast(ps.getValue(weight, x.getDevice(), training), DataType.FLOAT32);
            NDArray logits = TypeCasts.cast(x, DataType.FLOAT32).matMul(w.transpose()); // (N, E)
            return config.isV3() ? routeV3(ps, logits, training) : routeV2(logits);
        });
    }

    private NDList routeV3(ParameterStore ps, NDArray logits, boolean training) {
        NDArray scores = Activation.sigmoid(logits); // (N, E)
        NDArray bias = ps.getValue(correctionBias, logits.getDevice(), training).toType(DataType.FLOAT32, false);
        NDArray choice = scores.stopGradient().add(bias.expandDims(0)); // (N, E)
        long n = scores.getShape().get(0);
        int groups = config.nGroup();
        NDArray grouped = choice.reshape(n, groups, experts / groups); // (N, G, E/G)
        NDArray groupScores = grouped.topK(2, -1, true, true).get(0).sum(new int[] {-1}); // (N, G)
        NDArray masked = maskGroups(choice, groupScores, groups);
        NDArray idx = masked.topK(topK, -1, true, true).get(1); // (N, k)
        NDArray weights = scores.gather(idx, 1); // (N, k)
        if (config.normTopkProb()) {
            weights = weights.div(Scalars.add(weights.sum(new int[] {-1}, true), 1e-20));
        }
        weights = Scalars.mul(weights, config.routedScalingFactor());
        return new NDList(idx, weights);
    }

    private NDList routeV2(NDArray logits) {
        NDArray scores = logits.softmax(-1); // (N, E)
        NDArray idx;
        if ("group_limited_greedy".equals(config.topkMethod())) {
            long n = scores.getShape().get(0);
            int groups = config.nGroup();
            NDArray plain = scores.stopGradient();
            NDArray groupScores = plain.reshape(n, groups, experts / groups).max(new int[] {-1}); // (N, G)
            idx = maskGroups(plain, groupScores, groups).topK(topK, -1, true, true).get(1); // (N, k)
        } else {
            idx = scores.stopGradient().topK(topK, -1, true, true).get(1); // (N, k)
        }
        NDArray weights = scores.gather(idx, 1); // (N, k)
        if (config.normTopkProb() && topK > 1) {
            weights = weights.div(Scalars.add(weights.sum(new int[] {-1}, true), 1e-20));
        }
        weights = Scalars.mul(weights, config.routedScalingFactor());
        return new NDList(idx, weights);
    }

    /** Zeroes the scores of experts outside the best {@code topk_group} groups (transformers' masked_fill 0.0). */
    private NDArray maskGroups(NDArray scores, NDArray groupScores, int groups) {
        long n = scores.getShape().get(0);
        NDManager m = scores.getManager();
        NDArray groupIdx = groupScores.topK(config.topkGroup(), -1, true, true).get(1); // (N, topk_group)
        NDArray groupMask = m.zeros(new Shape(n, groups), DataType.FLOAT32)
                .toDevice(scores.getDevice(), false)
                .scatter(groupIdx, m.ones(groupIdx.getShape(), DataType.FLOAT32).toDevice(scores.getDevice(), false),
                        1); // (N, G)
        NDArray scoreMask = groupMask.expandDims(-1).broadcast(n, groups, experts / groups).reshape(n, experts);
        return scores.mul(scoreMask); // masked experts -> 0 (scores are finite)
    }

    @Override
    public Shape[] getOutputShapes(Shape[] inputShapes) {
        long n = inputShapes[0].get(0);
        return new Shape[] {new Shape(n, topK), new Shape(n, topK)};
    }
}
