package ai.djl.memopt.model.deepseek;

import ai.djl.memopt.nn.Scalars;
import ai.djl.memopt.nn.TypeCasts;
import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDArrays;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.index.NDIndex;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import com.google.common.base.Preconditions;

/**
 * Next-token cross-entropy of a causal language model, in FP32: position {@code t} of the logits predicts token
 * {@code t+1}, i.e. {@code logits[:, :-1]} against {@code input_ids[:, 1:]}, as transformers' {@code ForCausalLMLoss}.
 * With an attention mask, targets at padded positions ({@code mask[:, 1:] == 0}) are ignored.
 *
 * <p>Shapes: {@code logits (B, T, V)}, {@code input_ids (B, T)}, optional {@code mask (B, T)}; the loss is a scalar.
 *
 * <pre>{@code
 * NDArray loss = CausalLmLoss.mean(logits, inputIds);          // differentiable scalar
 * CausalLmLoss.Sum s = CausalLmLoss.sum(logits, inputIds, mask); // for averaging over windows
 * }</pre>
 */
public final class CausalLmLoss {

    private CausalLmLoss() {}

    /** Mean next-token cross-entropy over all {@code B * (T-1)} predicted tokens; a differentiable FP32 scalar. */
    public static NDArray mean(NDArray logits, NDArray inputIds) {
        return mean(logits, inputIds, null);
    }

    /** Mean over the targets the mask keeps ({@code mask} may be null). */
    public static NDArray mean(NDArray logits, NDArray inputIds, NDArray mask) {
        return Scoped.run(() -> {
            NDList parts = perToken(logits, inputIds, mask);
            NDArray count = parts.get(1).sum();
            // a device-made 1 (maximum(1f) would upload the number from the host, a device wait on a GPU)
            return new NDList(parts.get(0).sum().div(NDArrays.maximum(count, Scalars.like(count, 1))));
        }).head();
    }

    /** Summed loss and number of predicted tokens (for averaging over several windows). */
    public static Sum sum(NDArray logits, NDArray inputIds, NDArray mask) {
        NDList totals = Scoped.run(() -> {
            NDList parts = perToken(logits, inputIds, mask);
            return new NDList(parts.get(0).sum(), parts.get(1).sum());
        });
        try {
            return new Sum(totals.get(0).toType(DataType.FLOAT64, false).getDouble(), (long) totals.get(1).getFloat());
        } finally {
            totals.close();
        }
    }

    /** Summed negative log-likelihood (nats) and the number of tokens it covers. */
    public static final class Sum {
        private final double nll;
        private final long tokens;

        Sum(double nll, long tokens) {
            this.nll = nll;
            this.tokens = tokens;
        }

        public double nll() {
            return nll;
        }

        public long tokens() {
            return tokens;
        }
    }

    /** (per-target nll * keep, keep), both {@code (B, T-1)} FP32. */
    private static NDList perToken(NDArray logits, NDArray inputIds, NDArray mask) {
        Shape ls = logits.getShape();
        Shape is = inputIds.getShape();
        Preconditions.checkArgument(ls.dimension() == 3 && is.dimension() == 2 && ls.get(0) == is.get(0)
                        && ls.get(1) == is.get(1),
                "logits (B, T, V) and input_ids (B, T) must agree, got %s and %s", ls, is);
        Preconditions.checkArgument(is.get(1) >= 2, "need at least 2 tokens per row to predict one, got %s", is);
        return Scoped.run(() -> {
            NDArray pred = TypeCasts.cast(logits.get(new NDIndex(":, :-1, :")), DataType.FLOAT32); // (B, T-1, V)
            NDArray targets = inputIds.get(new NDIndex(":, 1:")).toType(DataType.INT64, false); // (B, T-1)
            NDArray logp = pred.logSoftmax(-1); // (B, T-1, V)
            NDArray picked = logp.gather(targets.expandDims(-1), 2).squeeze(-1); // (B, T-1)
            NDArray keep = mask == null
                    ? picked.onesLike()
                    : mask.get(new NDIndex(":, 1:")).toType(DataType.FLOAT32, false).neq(0).toType(DataType.FLOAT32,
                            false);
            return new NDList(picked.neg().mul(keep), keep);
        });
    }
}
