package ai.djl.memopt.model.deepseek;

import ai.djl.ndarray.NDArray;
import ai.djl.ndarray.NDList;
import ai.djl.ndarray.NDScope;
import java.util.function.Supplier;

/**
 * Runs a forward body in an {@link NDScope} so every temporary it creates is closed on exit; only the returned arrays
 * survive, handed to the caller's scope (if any) so that its own temporaries are closed in turn. Autograd keeps its own
 * references to saved tensors, so closing the Java handles of intermediates is safe inside a gradient collector.
 */
final class Scoped {

    private Scoped() {}

    static NDList run(Supplier<NDList> body) {
        NDList out;
        try (NDScope scope = new NDScope()) {
            scope.suppressNotUsedWarning();
            out = body.get();
            NDScope.unregister(out);
        }
        for (NDArray a : out) {
            NDScope.register(a);
        }
        return out;
    }
}
