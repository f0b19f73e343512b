package ai.djl.memopt.model.deepseek;

import ai.djl.pytorch.engine.PtNDArray;
import ai.djl.pytorch.engine.PtNDManager;
import ai.djl.pytorch.engine.PtSymbolBlock;
import ai.djl.pytorch.jni.IValue;
import java.lang.reflect.Constructor;
import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.util.ArrayList;
import java.util.List;

/**
 * Calls a TorchScript module's {@code forward} in training mode with typed arguments (tensor lists, booleans, ints).
 * DJL 0.36 offers training mode only through {@code IValueUtils.forward(block, NDList, true)}, which passes each array
 * as one tensor (lists only by renaming the arrays, which would rename the model's parameter arrays); its
 * {@code IValue} entry point always runs under an inference guard, whose outputs record no autograd. So the native
 * {@code moduleRunMethod} is called here with {@code isTrain = true}, reached by reflection as other classes of this
 * project reach DJL internals; if DJL changes, {@link #UNAVAILABLE} says why and the layers keep the Java path.
 */
final class TrainingCalls {

    /** Why the call cannot be made (DJL's internals changed), or null. */
    static final String UNAVAILABLE;

    private static final Object LIB;
    private static final Method RUN;
    private static final Constructor<IValue> IVALUE;

    static {
        Object lib = null;
        Method run = null;
        Constructor<IValue> ivalue = null;
        String why = null;
        try {
            Class<?> library = Class.forName("ai.djl.pytorch.jni.PyTorchLibrary");
            Field f = library.getDeclaredField("LIB");
            f.setAccessible(true);
            lib = f.get(null);
            run = library.getDeclaredMethod("moduleRunMethod", long.class, String.class, long[].class,
                    boolean.class, boolean.class);
            run.setAccessible(true);
            ivalue = IValue.class.getDeclaredConstructor(long.class);
            ivalue.setAccessible(true);
        } catch (ReflectiveOperationException | RuntimeException e) {
            why = "DJL's PyTorchLibrary.moduleRunMethod(long, String, long[], boolean, boolean) is not reachable ("
                    + e + ")";
        }
        LIB = lib;
        RUN = run;
        IVALUE = ivalue;
        UNAVAILABLE = why;
    }

    private TrainingCalls() {}

    /**
     * Runs the layer module ({@link ScriptedLayerSource}'s {@code forward}) and returns its tensor in {@code x}'s
     * manager.
     */
    static PtNDArray run(PtSymbolBlock module, PtNDArray x, PtNDArray cos, PtNDArray sin, PtNDArray mask,
            List<PtNDArray> weights, List<List<PtNDArray>> experts, boolean fused, long group, long bucket) {
        List<IValue> args = new ArrayList<>(11);
        try {
            args.add(IValue.from(x));
            args.add(IValue.from(cos));
            args.add(IValue.from(sin));
            args.add(IValue.listFrom(mask == null ? new PtNDArray[0] : new PtNDArray[] {mask}));
            args.add(IValue.listFrom(weights.toArray(new PtNDArray[0])));
            for (int i = 0; i < 3; i++) {
                args.add(IValue.listFrom(
                        experts.isEmpty() ? new PtNDArray[0] : experts.get(i).toArray(new PtNDArray[0])));
            }
            args.add(IValue.from(fused));
            args.add(IValue.from(group));
            args.add(IValue.from(bucket));
            long[] handles = new long[args.size()];
            for (int i = 0; i < handles.length; i++) {
                handles[i] = args.get(i).getHandle();
            }
            long result = (Long) RUN.invoke(LIB, module.getHandle(), "forward", handles, true, false);
            try (IValue out = IVALUE.newInstance(result)) {
                return out.toTensor((PtNDManager) x.getManager());
            }
        } catch (java.lang.reflect.InvocationTargetException e) {
            Throwable cause = e.getCause();
            if (cause instanceof RuntimeException) {
                throw (RuntimeException) cause; // libtorch's error (EngineException), e.g. a shape or type mismatch
            }
            throw new IllegalStateException("the scripted decoder layer failed", cause);
        } catch (ReflectiveOperationException e) {
            throw new IllegalStateException("cannot call the scripted decoder layer: " + e, e);
        } finally {
            args.forEach(IValue::close);
        }
    }
}
