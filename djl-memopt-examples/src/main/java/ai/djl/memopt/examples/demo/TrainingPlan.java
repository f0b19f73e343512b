package ai.djl.memopt.examples.demo;

import ai.djl.memopt.finetune.FineTuner;
import com.google.common.base.Preconditions;
import java.util.Locale;
import java.util.function.Supplier;

/**
 * How the demo trains, chosen from what the device computes fast.
 *
 * <ul>
 *   <li>FP16 is fast (a GPU, or a CPU whose FP16 matrix product is at most {@link #FAST_FP16_MAX_SLOWDOWN} times
 *       FP32's): every step in FP16 with FP32 master weights and dynamic loss scaling, with activation checkpointing.
 *   <li>FP16 is slow (a CPU without FP16 arithmetic: 4x slower fine-tuning measured on an AVX2 AMD EPYC): the steps
 *       run in FP32 with activation checkpointing, and FP16 mixed precision is shown on a short run of
 *       {@link #FP16_SHOWCASE_STEPS} steps from the same start on the same batches, compared with the FP32 run's
 *       first steps.
 * </ul>
 *
 * <p>The default step counts keep the whole demo within about five minutes on two cores either way (the 300 FP16 steps
 * and everything else took 1.2 minutes on a Xeon with AVX512-FP16; on a 2-core EPYC with one other job running,
 * {@link #FP32_STEPS} FP32 steps with checkpointing took 1 min 49 s at 1,880 tokens/s, the showcase 33 s, the whole
 * demo 3.3 minutes, where 300 FP16 steps would have taken about 25 minutes).
 *
 * @param precision the main run's precision
 * @param steps the main run's steps
 * @param fp16Steps steps of the FP16 showcase run (0 when the main run is FP16)
 * @param reason one sentence saying what was chosen and why
 */
public record TrainingPlan(FineTuner.Precision precision, int steps, int fp16Steps, String reason) {

    /** FP16 counts as fast up to this ratio of its matrix-product time to FP32's. */
    public static final double FAST_FP16_MAX_SLOWDOWN = 1.5;
    /** Steps when training in FP16. */
    public static final int FP16_STEPS = 300;
    /** Steps when training in FP32. */
    public static final int FP32_STEPS = 200;
    /** Steps of the FP16 showcase run beside an FP32 main run. */
    public static final int FP16_SHOWCASE_STEPS = 8;

    public TrainingPlan {
        Preconditions.checkArgument(steps >= 1, "steps %s", steps);
        Preconditions.checkArgument(fp16Steps >= 0 && fp16Steps <= steps, "fp16Steps %s of %s", fp16Steps, steps);
        Preconditions.checkArgument(precision == FineTuner.Precision.FP32 || fp16Steps == 0,
                "an FP16 main run needs no FP16 showcase");
    }

    /**
     * Chooses the plan.
     *
     * @param dtype {@code auto}, {@code fp32} or {@code fp16} (the demo's {@code --dtype})
     * @param steps the {@code --steps} given, or null for the plan's default
     * @param gpu whether training runs on a GPU (FP16 is fast there)
     * @param cpu this machine's CPU, for the explanation
     * @param probe measures FP16 against FP32; called only for {@code auto} on a CPU
     */
    public static TrainingPlan choose(String dtype, Integer steps, boolean gpu, CpuProfile cpu,
            Supplier<Fp16Probe> probe) {
        String d = dtype.trim().toLowerCase(Locale.ROOT);
        boolean fp16;
        String why;
        switch (d) {
            case "auto":
                if (gpu) {
                    fp16 = true;
                    why = "on a GPU FP16 runs on tensor cores";
                } else {
                    Fp16Probe p = probe.get();
                    fp16 = p.slowdown() <= FAST_FP16_MAX_SLOWDOWN;
                    why = String.format(Locale.ROOT, "%s: %s, so FP16 is %s", cpu.describe(), p,
                            fp16 ? "fast here" : "slow here (no FP16 arithmetic)");
                }
                break;
            case "fp16":
            case "float16":
                fp16 = true;
                why = "--dtype fp16 was given";
                break;
            case "fp32":
            case "float32":
                fp16 = false;
                why = "--dtype fp32 was given";
                break;
            default:
                throw new IllegalArgumentException("--dtype must be auto, fp32 or fp16, got '" + dtype + "'");
        }
        if (fp16) {
            int n = steps != null ? steps : FP16_STEPS;
            return new TrainingPlan(FineTuner.Precision.FP16, n, 0, why + ": training in FP16 with FP32 master"
                    + " weights");
        }
        int n = steps != null ? steps : FP32_STEPS;
        int showcase = Math.min(FP16_SHOWCASE_STEPS, n);
        return new TrainingPlan(FineTuner.Precision.FP32, n, showcase, why + ": training in FP32, with FP16 mixed"
                + " precision shown on a short run of " + showcase + " steps beside it");
    }
}
