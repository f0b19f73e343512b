package ai.djl.memopt.memory;

import ai.djl.Device;
import ai.djl.util.cuda.CudaUtils;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.lang.management.MemoryUsage;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;

/**
 * Memory figures the process can read about itself. DJL has no binding to PyTorch's allocator statistics, so on CPU
 * the process's resident set is the measure (native tensors live outside the Java heap), and on a GPU the device-wide
 * figure from {@link CudaUtils#getGpuMemory(Device)}.
 *
 * <p>{@code VmHWM} is a per-process high-water mark that cannot be reset: compare configurations in fresh JVMs.
 */
public final class MemoryStats {

    private static final Path STATUS = Path.of("/proc/self/status");
    private static final Path MEMINFO = Path.of("/proc/meminfo");

    private MemoryStats() {}

    /** Current resident set size in bytes ({@code VmRSS}), or -1 where /proc is not available. */
    public static long residentBytes() {
        return statusField("VmRSS:");
    }

    /** Peak resident set size in bytes since the process started ({@code VmHWM}), or -1 where unavailable. */
    public static long peakResidentBytes() {
        return statusField("VmHWM:");
    }

    /** Device memory in use on a GPU (device-wide, includes other processes), or the process RSS for a CPU device. */
    public static long deviceBytesInUse(Device device) {
        if (device.isGpu()) {
            MemoryUsage usage = CudaUtils.getGpuMemory(device);
            return usage.getUsed();
        }
        return residentBytes();
    }

    /**
     * Memory free for new allocations on {@code device}: on a GPU the device-wide free memory
     * ({@code cudaMemGetInfo}: total - used, all processes); on the CPU the system's {@code MemAvailable}
     * ({@code /proc/meminfo}), or -1 where unavailable.
     */
    public static long deviceBytesFree(Device device) {
        if (device.isGpu()) {
            MemoryUsage usage = CudaUtils.getGpuMemory(device);
            return usage.getMax() - usage.getUsed();
        }
        return field(MEMINFO, "MemAvailable:");
    }

    private static long statusField(String field) {
        return field(STATUS, field);
    }

    private static long field(Path file, String field) {
        if (!Files.isReadable(file)) {
            return -1;
        }
        try {
            List<String> lines = Files.readAllLines(file);
            for (String line : lines) {
                if (line.startsWith(field)) {
                    String[] parts = line.substring(field.length()).trim().split("\\s+");
                    long value = Long.parseLong(parts[0]);
                    return parts.length > 1 && "kB".equals(parts[1]) ? value * 1024 : value;
                }
            }
            return -1;
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }
}
