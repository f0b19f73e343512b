package ai.djl.memopt.model.deepseek;

import ai.djl.Device;
import ai.djl.ndarray.NDManager;
import com.google.common.base.Preconditions;
import com.google.common.collect.ImmutableList;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Where the weights of a DeepSeek model are allocated: the decoder layers split into stages of consecutive layers,
 * each stage's weights on its own {@link NDManager} (and so on its own device), for a model that no single device
 * holds. The loaders ({@link DeepSeekLoader}, and through {@code ModelDirectories} quantized artifacts and GGUF files)
 * read each tensor straight onto its stage's manager; nothing is loaded whole first.
 *
 * <p>Which stage a weight belongs to, by its Hugging Face name:
 *
 * <ul>
 *   <li>{@code model.embed_tokens.*}: the first stage;
 *   <li>{@code model.layers.N.*}: the stage holding layer {@code N};
 *   <li>{@code model.norm.*} and {@code lm_head.*}: the last stage; with tied embeddings the final norm goes to the
 *       first stage, where the embedding table that computes the logits lives (a decoder then sends the last
 *       position's hidden state back there instead of copying the table every step).
 * </ul>
 *
 * <pre>{@code
 * try (LayerPlacement placement = LayerPlacement.of(List.of(Device.gpu(0), Device.gpu(1)), new int[] {0, 14}, 27)) {
 *     DeepSeekForCausalLM lm = DeepSeekLoader.load(dir, placement, DataType.FLOAT16);  // layers 0-13 on gpu0
 * }
 * // or, owned by the model: DeepSeekLoader.load(dir, LayerPlacement.of(...), dtype) then lm.ownManager()
 * }</pre>
 *
 * <p>{@link #single(NDManager)} puts everything on one manager: the loaders' usual case.
 */
public final class LayerPlacement implements AutoCloseable {

    private static final Pattern LAYER = Pattern.compile("^model\\.layers\\.(\\d+)\\..*");

    private final ImmutableList<NDManager> managers;
    private final int[] firstLayers;
    private final int numLayers;
    private final boolean owned;

    private LayerPlacement(List<NDManager> managers, int[] firstLayers, int numLayers, boolean owned) {
        this.managers = ImmutableList.copyOf(managers);
        this.firstLayers = firstLayers.clone();
        this.numLayers = numLayers;
        this.owned = owned;
    }

    /** Everything on {@code manager}, which the caller keeps owning ({@link #close()} does not close it). */
    public static LayerPlacement single(NDManager manager) {
        Preconditions.checkNotNull(manager, "manager");
        return new LayerPlacement(List.of(manager), new int[] {0}, Integer.MAX_VALUE, false);
    }

    /**
     * Stages of consecutive layers, stage {@code s} holding layers {@code firstLayers[s]} up to the next stage's first,
     * each on a new base manager on {@code devices.get(s)} that this placement owns ({@link #close()} frees them).
     *
     * @param firstLayers strictly increasing, starting at 0, every one below {@code numLayers} (no empty stage)
     * @throws IllegalArgumentException naming the bad stage
     */
    public static LayerPlacement of(List<Device> devices, int[] firstLayers, int numLayers) {
        Preconditions.checkArgument(devices != null && !devices.isEmpty(), "a placement needs at least one device");
        checkStages(devices.size(), firstLayers, numLayers);
        List<NDManager> managers = new ArrayList<>(devices.size());
        try {
            for (Device d : devices) {
                managers.add(NDManager.newBaseManager(Preconditions.checkNotNull(d, "device")));
            }
        } catch (RuntimeException e) {
            managers.forEach(NDManager::close);
            throw e;
        }
        return new LayerPlacement(managers, firstLayers, numLayers, true);
    }

    static void checkStages(int stages, int[] firstLayers, int numLayers) {
        Preconditions.checkArgument(firstLayers != null && firstLayers.length == stages,
                "%s devices need %s stage starts, got %s", stages, stages,
                firstLayers == null ? "none" : String.valueOf(firstLayers.length));
        Preconditions.checkArgument(numLayers >= stages,
                "%s stages need at least %s decoder layers, the model has %s", stages, stages, numLayers);
        Preconditions.checkArgument(firstLayers[0] == 0, "the first stage must start at layer 0, got %s",
                firstLayers[0]);
        for (int s = 1; s < stages; s++) {
            Preconditions.checkArgument(firstLayers[s] > firstLayers[s - 1] && firstLayers[s] < numLayers,
                    "stage %s starts at layer %s: stages must start in increasing order below %s, without an empty"
                            + " stage (stage %s starts at %s)", s, firstLayers[s], numLayers, s - 1, firstLayers[s - 1]);
        }
    }

    /** The number of stages. */
    public int stages() {
        return managers.size();
    }

    /** The manager of stage {@code stage}. */
    public NDManager manager(int stage) {
        return managers.get(stage);
    }

    /** The device of stage {@code stage}. */
    public Device device(int stage) {
        return managers.get(stage).getDevice();
    }

    /** The first layer of stage {@code stage}. */
    public int firstLayer(int stage) {
        return firstLayers[stage];
    }

    /** The stage holding layer {@code layer}. */
    public int stageOfLayer(int layer) {
        Preconditions.checkArgument(layer >= 0, "layer %s", layer);
        int s = 0;
        while (s + 1 < firstLayers.length && firstLayers[s + 1] <= layer) {
            s++;
        }
        return s;
    }

    /**
     * The stage a weight goes to, by its Hugging Face name (see the class documentation).
     *
     * @param tiedEmbeddings whether the model computes its logits with the embedding table
     */
    public int stageOf(String parameterName, boolean tiedEmbeddings) {
        Matcher m = LAYER.matcher(parameterName);
        if (m.matches()) {
            long layer = Long.parseLong(m.group(1));
            return layer >= numLayers ? stages() - 1 : stageOfLayer((int) layer);
        }
        if (parameterName.startsWith("model.embed_tokens.")) {
            return 0;
        }
        if (parameterName.startsWith("model.norm.")) {
            return tiedEmbeddings ? 0 : stages() - 1;
        }
        return stages() - 1; // lm_head.*
    }

    /** The manager a weight is allocated on ({@link #stageOf}). */
    public NDManager managerFor(String parameterName, boolean tiedEmbeddings) {
        return managers.get(stageOf(parameterName, tiedEmbeddings));
    }

    /** Closes the stage managers this placement created (not one handed to {@link #single}). */
    @Override
    public void close() {
        if (owned) {
            managers.forEach(NDManager::close);
        }
    }

    @Override
    public String toString() {
        if (numLayers == Integer.MAX_VALUE) {
            return device(0) + ": all weights";
        }
        StringBuilder sb = new StringBuilder();
        for (int s = 0; s < stages(); s++) {
            int end = s + 1 < stages() ? firstLayers[s + 1] - 1 : numLayers - 1;
            sb.append(s == 0 ? "" : ", ").append(device(s)).append(": layers ").append(firstLayers[s]).append('-')
                    .append(end);
        }
        return sb.toString();
    }
}
