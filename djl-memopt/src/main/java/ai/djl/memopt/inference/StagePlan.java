package ai.djl.memopt.inference;

import ai.djl.Device;
import ai.djl.memopt.export.ModelSizes;
import ai.djl.memopt.memory.MemoryStats;
import ai.djl.memopt.model.deepseek.LayerPlacement;
import ai.djl.ndarray.types.DataType;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;

/**
 * How a DeepSeek decoder is split over devices: stages of consecutive decoder layers, each on one device. The
 * embeddings go with the first stage, the final norm and {@code lm_head} with the last; between stages only the
 * hidden state moves ({@link MlaCachedDecoder}), and each layer's MLA cache stays on its stage's device.
 *
 * <p>A split is given by hand ({@link #parse}: layer ranges such as {@code 0-13,14-26}, one per device, in order,
 * covering every layer) or chosen from each device's free memory ({@link #byMemory}: the contiguous split whose
 * fullest device is the least full, relative to what it has free). One device is {@link #single}.
 *
 * <pre>{@code
 * StagePlan plan = StagePlan.parse(List.of(Device.gpu(0), Device.gpu(1)), "0-13,14-26", 27);
 * try (LayerPlacement placement = plan.newPlacement()) {
 *     DeepSeekForCausalLM lm = ModelDirectories.loadDeepSeek(dir, placement, DataType.FLOAT16);
 *     LanguageModel decoder = new MlaCachedDecoder(lm, plan, ExpertDispatch.AUTO);
 * }
 * }</pre>
 */
public final class StagePlan {

    /**
     * One stage: layers {@code [firstLayer, endLayer)} on {@code device}.
     *
     * @param device where the stage's weights, cache and computation live
     * @param firstLayer its first decoder layer
     * @param endLayer one past its last
     */
    public record Stage(Device device, int firstLayer, int endLayer) {

        /** The number of layers in the stage. */
        public int layers() {
            return endLayer - firstLayer;
        }
    }

    private final ImmutableList<Stage> stages;
    private final int numLayers;

    private StagePlan(List<Stage> stages, int numLayers) {
        this.stages = ImmutableList.copyOf(stages);
        this.numLayers = numLayers;
    }

    /** Every layer on {@code device}. */
    public static StagePlan single(Device device, int numLayers) {
        return of(List.of(device), new int[] {0}, numLayers);
    }

    /**
     * Stage {@code s} on {@code devices.get(s)}, from layer {@code firstLayers[s]} to the next stage's first.
     *
     * @throws IllegalArgumentException for starts that are not increasing from 0, an empty stage, or more stages
     *     than layers
     */
    public static StagePlan of(List<Device> devices, int[] firstLayers, int numLayers) {
        Preconditions.checkArgument(devices != null && !devices.isEmpty(), "a stage plan needs at least one device");
        Preconditions.checkArgument(firstLayers != null && firstLayers.length == devices.size(),
                "%s devices need %s stages, got %s", devices.size(), devices.size(),
                firstLayers == null ? 0 : firstLayers.length);
        Preconditions.checkArgument(numLayers >= devices.size(),
                "%s devices need at least as many decoder layers, the model has %s", devices.size(), numLayers);
        List<Stage> stages = new ArrayList<>();
        for (int s = 0; s < devices.size(); s++) {
            int end = s + 1 < devices.size() ? firstLayers[s + 1] : numLayers;
            Preconditions.checkArgument(firstLayers[s] == (s == 0 ? 0 : stages.get(s - 1).endLayer()) && end > firstLayers[s],
                    "stage %s starts at layer %s and ends before %s: stages must cover layers 0-%s in order, none"
                            + " empty", s, firstLayers[s], end, numLayers - 1);
            stages.add(new Stage(Preconditions.checkNotNull(devices.get(s), "device %s", s), firstLayers[s], end));
        }
        return new StagePlan(stages, numLayers);
    }

    /**
     * A split given by hand, one entry per device, in order, separated by commas: either the number of layers each
     * device holds ({@code 14,13} for 27 layers on two devices), or inclusive layer ranges {@code first-last} (or a
     * single layer {@code n}) covering layers {@code 0} to {@code numLayers - 1} ({@code 0-13,14-26}).
     *
     * @throws IllegalArgumentException naming the bad entry and what was expected: a count or range per device,
     *     counts that sum to the layer count, no device without a layer
     */
    public static StagePlan parse(List<Device> devices, String split, int numLayers) {
        Preconditions.checkArgument(split != null && !split.isBlank(), "the split is empty: expected the layers of"
                + " each device such as %s,%s", (numLayers + 1) / 2, numLayers / 2);
        Preconditions.checkArgument(numLayers >= devices.size(), "%s devices need at least as many decoder layers,"
                + " the model has %s", devices.size(), numLayers);
        String[] parts = split.split(",", -1);
        Preconditions.checkArgument(parts.length == devices.size(), "split '%s' has %s entries for %s devices (%s):"
                + " give one per device", split, parts.length, devices.size(), devices);
        return split.contains("-") ? parseRanges(devices, split, parts, numLayers)
                : parseCounts(devices, split, parts, numLayers);
    }

    private static StagePlan parseCounts(List<Device> devices, String split, String[] parts, int numLayers) {
        int[] first = new int[parts.length];
        int sum = 0;
        for (int s = 0; s < parts.length; s++) {
            int count;
            try {
                count = Integer.parseInt(parts[s].trim());
            } catch (NumberFormatException e) {
                throw new IllegalArgumentException("split '" + split + "': entry " + (s + 1) + " '" + parts[s].trim()
                        + "' is not a layer count (or a range FIRST-LAST)", e);
            }
            Preconditions.checkArgument(count >= 1, "split '%s': %s gets %s layers; every device needs at least one",
                    split, devices.get(s), count);
            first[s] = sum;
            sum += count;
        }
        Preconditions.checkArgument(sum == numLayers, "split '%s' places %s layers; the model has %s decoder layers",
                split, sum, numLayers);
        return of(devices, first, numLayers);
    }

    private static StagePlan parseRanges(List<Device> devices, String split, String[] parts, int numLayers) {
        int[] first = new int[parts.length];
        int expected = 0;
        for (int s = 0; s < parts.length; s++) {
            String p = parts[s].trim();
            int dash = p.indexOf('-', 1);
            int a;
            int b;
            try {
                a = Integer.parseInt(dash < 0 ? p : p.substring(0, dash).trim());
                b = dash < 0 ? a : Integer.parseInt(p.substring(dash + 1).trim());
            } catch (NumberFormatException e) {
                throw new IllegalArgumentException("split '" + split + "': range " + (s + 1) + " '" + p + "' is not"
                        + " FIRST-LAST or a layer number", e);
            }
            Preconditions.checkArgument(a == expected, "split '%s': range %s '%s' must start at layer %s (ranges are"
                    + " consecutive, starting at 0)", split, s + 1, p, expected);
            Preconditions.checkArgument(b >= a, "split '%s': range %s '%s' ends before it starts", split, s + 1, p);
            Preconditions.checkArgument(b < numLayers, "split '%s': range %s '%s' goes past the last layer, %s",
                    split, s + 1, p, numLayers - 1);
            first[s] = a;
            expected = b + 1;
        }
        Preconditions.checkArgument(expected == numLayers, "split '%s' ends at layer %s; the model's last layer is %s",
                split, expected - 1, numLayers - 1);
        return of(devices, first, numLayers);
    }

    /**
     * A split chosen from memory: the contiguous split of the layers over {@code devices}, in order, that minimises the
     * largest {@code bytes on a device / capacity of that device} (so equal devices get equal shares, and a device with
     * more room gets more layers), with every stage holding at least one layer.
     *
     * @param layerBytes the bytes of each decoder layer's weights
     * @param firstStageBytes what the first stage holds besides its layers (the embeddings)
     * @param lastStageBytes what the last stage holds besides its layers (final norm, {@code lm_head})
     * @param capacity the bytes each device can give the weights (free memory less a reserve for the cache and the
     *     activations)
     * @throws IllegalArgumentException if no split fits, naming each device's need and capacity
     */
    public static StagePlan byMemory(List<Device> devices, long[] layerBytes, long firstStageBytes, long lastStageBytes,
            long[] capacity) {
        int n = layerBytes.length;
        int stages = devices.size();
        Preconditions.checkArgument(capacity.length == stages, "%s devices, %s capacities", stages, capacity.length);
        Preconditions.checkArgument(n >= stages, "%s devices need at least as many decoder layers, the model has %s",
                stages, n);
        long[] prefix = new long[n + 1];
        for (int i = 0; i < n; i++) {
            prefix[i + 1] = prefix[i] + layerBytes[i];
        }
        // best[s][j]: the least largest load ratio of stages 0..s holding layers [0, j); from[s][j]: where stage s starts
        double[][] best = new double[stages][n + 1];
        int[][] from = new int[stages][n + 1];
        for (int s = 0; s < stages; s++) {
            for (int j = 0; j <= n; j++) {
                best[s][j] = Double.POSITIVE_INFINITY;
                for (int i = s == 0 ? 0 : s; i < j && (s > 0 || i == 0); i++) {
                    double before = s == 0 ? 0 : best[s - 1][i];
                    long load = prefix[j] - prefix[i] + (s == 0 ? firstStageBytes : 0)
                            + (s == stages - 1 ? lastStageBytes : 0);
                    double ratio = Math.max(before, ratio(load, capacity[s]));
                    if (ratio < best[s][j]) {
                        best[s][j] = ratio;
                        from[s][j] = i;
                    }
                }
            }
        }
        if (Double.isInfinite(best[stages - 1][n])) {
            List<String> full = new ArrayList<>();
            for (int s = 0; s < stages; s++) {
                if (capacity[s] <= 0) {
                    full.add(devices.get(s) + " (" + gib(capacity[s]) + ")");
                }
            }
            throw new IllegalArgumentException("no room for weights on " + String.join(", ", full)
                    + " after the reserve for the cache and activations: free memory there, or leave it out");
        }
        int[] first = new int[stages];
        int end = n;
        for (int s = stages - 1; s >= 0; s--) {
            first[s] = from[s][end];
            end = first[s];
        }
        StagePlan plan = of(devices, first, n);
        if (best[stages - 1][n] > 1) {
            StringBuilder sb = new StringBuilder("the weights do not fit the devices' free memory: the best split ("
                    + plan.describe() + ") needs");
            for (int s = 0; s < stages; s++) {
                Stage st = plan.stages.get(s);
                long load = prefix[st.endLayer()] - prefix[st.firstLayer()] + (s == 0 ? firstStageBytes : 0)
                        + (s == stages - 1 ? lastStageBytes : 0);
                sb.append(s == 0 ? " " : ", ").append(gib(load)).append(" on ").append(st.device()).append(" (")
                        .append(gib(Math.max(0, capacity[s]))).append(" free for weights)");
            }
            throw new IllegalArgumentException(sb.append(": add devices, quantize the model (int4), or give the split by"
                    + " hand (memopt: --layer-split)").toString());
        }
        return plan;
    }

    /** The share of a device's free memory kept back from the weights for the cache, activations and logits. */
    static final double RESERVE_FRACTION = 0.1;

    /** What a GPU keeps back besides {@link #RESERVE_FRACTION}: the CUDA context and libtorch's workspaces. */
    static final long GPU_RESERVE_BYTES = 512L << 20;

    /**
     * The stage plan for the model at {@code path} (a checkpoint directory, quantized artifact or GGUF file) over
     * {@code devices}: {@link #parse} of {@code split} when given, else {@link #byMemory} with each weight's bytes as
     * loaded (read from the file headers, {@link ModelSizes}) and each device's free memory now
     * ({@link MemoryStats#deviceBytesFree}: {@code cudaMemGetInfo} on a GPU, {@code MemAvailable} on the CPU), less
     * {@link #RESERVE_FRACTION} of it (and {@link #GPU_RESERVE_BYTES} on a GPU); a device listed twice shares its free
     * memory between its stages.
     *
     * @param split layers per device or layer ranges ({@link #parse}), or null to choose by memory
     * @throws IOException if the model's files cannot be read
     * @throws IllegalArgumentException for a bad split, or weights that fit no split of the devices' free memory
     */
    public static StagePlan choose(Path path, List<Device> devices, DataType dtype, String split) throws IOException {
        Preconditions.checkArgument(devices != null && !devices.isEmpty(), "a stage plan needs at least one device");
        ModelSizes.Sizes sizes = ModelSizes.of(path, dtype);
        int n = sizes.layers().length;
        if (split != null) {
            return parse(devices, split, n);
        }
        if (devices.size() == 1) {
            return single(devices.get(0), n);
        }
        Preconditions.checkArgument(n >= devices.size(), "%s devices need at least as many decoder layers, the model has %s"
                + " (%s)", devices.size(), n, path);
        long[] capacity = new long[devices.size()];
        for (int s = 0; s < capacity.length; s++) {
            Device d = devices.get(s);
            long free = MemoryStats.deviceBytesFree(d);
            Preconditions.checkArgument(free >= 0, "cannot read the free memory of %s: give the split by hand", d);
            long sharing = devices.stream().filter(d::equals).count();
            capacity[s] = (long) (free / sharing * (1 - RESERVE_FRACTION)) - (d.isGpu() ? GPU_RESERVE_BYTES : 0);
        }
        return byMemory(devices, sizes.layers(), sizes.embedding(), sizes.head(), capacity);
    }

    private static double ratio(long load, long capacity) {
        return capacity <= 0 ? (load == 0 ? 0 : Double.POSITIVE_INFINITY) : (double) load / capacity;
    }

    static String gib(long bytes) {
        return String.format(Locale.ROOT, "%.2f GiB", bytes / (double) (1L << 30));
    }

    public List<Stage> stages() {
        return stages;
    }

    /** The number of decoder layers the plan covers. */
    public int numLayers() {
        return numLayers;
    }

    /** Whether there is a single stage. */
    public boolean isSingle() {
        return stages.size() == 1;
    }

    /** The devices of the stages, in order (a device may appear more than once). */
    public List<Device> devices() {
        List<Device> out = new ArrayList<>();
        stages.forEach(s -> out.add(s.device()));
        return ImmutableList.copyOf(out);
    }

    /** The stage holding {@code layer}. */
    public int stageOfLayer(int layer) {
        Preconditions.checkArgument(layer >= 0 && layer < numLayers, "layer %s outside 0-%s", layer, numLayers - 1);
        for (int s = 0; s < stages.size(); s++) {
            if (layer < stages.get(s).endLayer()) {
                return s;
            }
        }
        throw new AssertionError(layer);
    }

    /**
     * New managers, one per stage on its device, that loaders allocate each weight on
     * ({@code ModelDirectories.loadDeepSeek(dir, placement, dtype)}); the caller owns it, or hands it to the model.
     */
    public LayerPlacement newPlacement() {
        int[] first = new int[stages.size()];
        for (int s = 0; s < first.length; s++) {
            first[s] = stages.get(s).firstLayer();
        }
        return LayerPlacement.of(devices(), first, numLayers);
    }

    /** The split in {@link #parse}'s syntax, e.g. {@code 0-13,14-26}. */
    public String describe() {
        StringBuilder sb = new StringBuilder();
        for (Stage s : stages) {
            sb.append(sb.length() == 0 ? "" : ",").append(s.firstLayer()).append('-').append(s.endLayer() - 1);
        }
        return sb.toString();
    }

    @Override
    public String toString() {
        StringBuilder sb = new StringBuilder();
        for (Stage s : stages) {
            sb.append(sb.length() == 0 ? "" : ", ").append(s.device()).append(": layers ").append(s.firstLayer())
                    .append('-').append(s.endLayer() - 1);
        }
        return sb.toString();
    }
}
