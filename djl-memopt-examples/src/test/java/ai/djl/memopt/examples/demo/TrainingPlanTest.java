package ai.djl.memopt.examples.demo;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.finetune.FineTuner;
import java.util.Set;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.Supplier;
import org.junit.jupiter.api.Test;

/** The demo's choice of precision and steps, for each kind of machine, with a stand-in for the measured probe. */
class TrainingPlanTest {

    /** /proc/cpuinfo of the 2-core AMD EPYC of issue 14 (abridged): AVX2 and F16C, no FP16 arithmetic. */
    static final String EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
            + "flags\t\t: fpu sse sse2 avx f16c avx2 fma bmi2\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\n";
    /** A Sapphire Rapids Xeon (abridged): AVX512-FP16 and AMX. */
    static final String XEON = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            + "flags\t\t: avx2 f16c avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n";

    private final AtomicInteger probes = new AtomicInteger();

    private Supplier<Fp16Probe> probe(double fp32, double fp16) {
        return () -> {
            probes.incrementAndGet();
            return new Fp16Probe(fp32, fp16);
        };
    }

    @Test
    void readsTheModelAndTheFp16Flags() {
        CpuProfile epyc = CpuProfile.parse(EPYC);
        assertEquals("AMD EPYC", epyc.model());
        assertFalse(epyc.hasFp16Arithmetic());
        assertEquals("AMD EPYC (avx2, f16c; no avx512_fp16/amx_fp16)", epyc.describe());
        CpuProfile xeon = CpuProfile.parse(XEON);
        assertTrue(xeon.hasFp16Arithmetic());
        assertEquals("Intel(R) Xeon(R) Platinum 8480+ (avx2, f16c, avx512f, avx512_bf16, avx512_fp16, amx_bf16)",
                xeon.describe());
        assertEquals("sparc (flags unknown)", new CpuProfile("sparc", Set.of()).describe());
    }

    @Test
    void aCpuWhoseFp16IsSlowTrainsInFp32AndShowsFp16OnAShortRun() {
        TrainingPlan plan = TrainingPlan.choose("auto", null, false, CpuProfile.parse(EPYC), probe(1e-4, 4.3e-4));
        assertEquals(FineTuner.Precision.FP32, plan.precision());
        assertEquals(TrainingPlan.FP32_STEPS, plan.steps());
        assertEquals(TrainingPlan.FP16_SHOWCASE_STEPS, plan.fp16Steps());
        assertTrue(plan.reason().contains("AMD EPYC") && plan.reason().contains("took 4.3x the time of FP32's")
                && plan.reason().contains("training in FP32"), plan.reason());
        assertEquals(1, probes.get());
    }

    @Test
    void aCpuWhoseFp16IsFastTrainsInFp16() {
        TrainingPlan plan = TrainingPlan.choose("auto", null, false, CpuProfile.parse(XEON), probe(1e-4, 0.6e-4));
        assertEquals(FineTuner.Precision.FP16, plan.precision());
        assertEquals(TrainingPlan.FP16_STEPS, plan.steps());
        assertEquals(0, plan.fp16Steps());
        assertTrue(plan.reason().contains("so FP16 is fast here: training in FP16"), plan.reason());
        // the threshold itself counts as fast
        assertEquals(FineTuner.Precision.FP16, TrainingPlan.choose("auto", null, false, CpuProfile.parse(XEON),
                probe(1e-4, TrainingPlan.FAST_FP16_MAX_SLOWDOWN * 1e-4)).precision());
    }

    @Test
    void aGpuOrAForcedChoiceNeedsNoProbe() {
        CpuProfile epyc = CpuProfile.parse(EPYC);
        assertEquals(FineTuner.Precision.FP16, TrainingPlan.choose("auto", null, true, epyc, probe(1, 9)).precision());
        TrainingPlan fp16 = TrainingPlan.choose("fp16", 12, false, epyc, probe(1, 9));
        assertEquals(FineTuner.Precision.FP16, fp16.precision());
        assertEquals(12, fp16.steps());
        TrainingPlan fp32 = TrainingPlan.choose("float32", 5, false, CpuProfile.parse(XEON), probe(1, 0.5));
        assertEquals(FineTuner.Precision.FP32, fp32.precision());
        assertEquals(5, fp32.steps());
        assertEquals(5, fp32.fp16Steps(), "the showcase never runs longer than the main run");
        assertTrue(fp32.reason().startsWith("--dtype fp32 was given"), fp32.reason());
        assertEquals(0, probes.get());
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
                () -> TrainingPlan.choose("bf16", null, false, epyc, probe(1, 1)));
        assertTrue(e.getMessage().contains("--dtype must be auto, fp32 or fp16, got 'bf16'"), e.getMessage());
    }
}
