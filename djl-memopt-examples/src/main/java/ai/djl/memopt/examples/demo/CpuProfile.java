package ai.djl.memopt.examples.demo;

import com.google.common.collect.ImmutableSet;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Set;

/**
 * What the CPU says about itself in {@code /proc/cpuinfo}: its model name and the instruction-set flags that decide
 * how fast FP16 runs. Only {@code avx512_fp16} (Sapphire Rapids and later Xeons) and {@code amx_fp16} (Granite Rapids)
 * are FP16 <em>arithmetic</em>; {@code f16c}, which every x86 CPU of the last decade has, only converts between FP16
 * and FP32, so FP16 matrix products there run through a conversion path several times slower than FP32.
 * {@code avx512_bf16}/{@code amx_bf16} speed up BF16, which DJL 0.36 cannot use.
 *
 * <p>The flags are what the demo reports; {@link Fp16Probe} measures what the engine actually does with them.
 */
public final class CpuProfile {

    /** Flags that mean native FP16 arithmetic. */
    static final List<String> FP16_ARITHMETIC = List.of("avx512_fp16", "amx_fp16");
    /** Flags shown in the demo's explanation, in this order, when present. */
    static final List<String> SHOWN = List.of("avx2", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
            "amx_fp16");

    private final String model;
    private final ImmutableSet<String> flags;

    CpuProfile(String model, Set<String> flags) {
        this.model = model;
        this.flags = ImmutableSet.copyOf(flags);
    }

    /** This machine's profile; an unknown model and no flags where {@code /proc/cpuinfo} is absent (not Linux). */
    public static CpuProfile current() {
        Path cpuinfo = Path.of("/proc/cpuinfo");
        try {
            return Files.isReadable(cpuinfo) ? parse(Files.readString(cpuinfo, StandardCharsets.UTF_8))
                    : new CpuProfile(System.getProperty("os.arch", "unknown CPU"), Set.of());
        } catch (IOException e) {
            return new CpuProfile(System.getProperty("os.arch", "unknown CPU"), Set.of());
        }
    }

    /** Parses the text of {@code /proc/cpuinfo} (the first processor's {@code model name} and {@code flags}). */
    static CpuProfile parse(String cpuinfo) {
        String model = null;
        Set<String> flags = null;
        for (String line : cpuinfo.split("\n")) {
            int colon = line.indexOf(':');
            if (colon < 0) {
                continue;
            }
            String key = line.substring(0, colon).trim();
            String value = line.substring(colon + 1).trim();
            if (model == null && key.equals("model name")) {
                model = value;
            } else if (flags == null && key.equals("flags")) {
                flags = ImmutableSet.copyOf(Arrays.asList(value.split("\\s+")));
            }
        }
        return new CpuProfile(model == null ? "unknown CPU" : model, flags == null ? Set.of() : flags);
    }

    /** The model name, e.g. {@code AMD EPYC} or {@code Intel(R) Xeon(R) Platinum 8480+}. */
    public String model() {
        return model;
    }

    public boolean has(String flag) {
        return flags.contains(flag);
    }

    /** Whether a flag says the CPU computes in FP16 natively ({@code avx512_fp16} or {@code amx_fp16}). */
    public boolean hasFp16Arithmetic() {
        return FP16_ARITHMETIC.stream().anyMatch(flags::contains);
    }

    /** E.g. {@code AMD EPYC (avx2, f16c; no avx512_fp16/amx_fp16)}. */
    public String describe() {
        if (flags.isEmpty()) {
            return model + " (flags unknown)";
        }
        List<String> shown = new ArrayList<>();
        for (String f : SHOWN) {
            if (flags.contains(f)) {
                shown.add(f);
            }
        }
        String fp16 = hasFp16Arithmetic() ? "" : (shown.isEmpty() ? "" : "; ") + "no avx512_fp16/amx_fp16";
        return model + " (" + String.join(", ", shown) + fp16 + ")";
    }

    @Override
    public String toString() {
        return describe();
    }
}
