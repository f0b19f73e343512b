package ai.djl.memopt.finetune;

import java.nio.file.Path;
import java.util.List;
import java.util.Locale;

/**
 * The training checkpoint a run resumes from ({@link FineTuner#findCheckpoint}), and the checkpoints of other runs it
 * passed over in the same directory. Immutable.
 */
public final class CheckpointChoice {

    private final Path checkpoint;
    private final long step;
    private final List<Path> otherRuns;

    CheckpointChoice(Path checkpoint, long step, List<Path> otherRuns) {
        this.checkpoint = checkpoint;
        this.step = step;
        this.otherRuns = List.copyOf(otherRuns);
    }

    /** The checkpoint directory to restore. */
    public Path checkpoint() {
        return checkpoint;
    }

    /** The step it was written at. */
    public long step() {
        return step;
    }

    /** Checkpoints in the same directory written by other runs (other data, settings or model), newest first. */
    public List<Path> otherRuns() {
        return otherRuns;
    }

    /** A line for the user about the checkpoints passed over, or null when there were none. */
    public String note() {
        if (otherRuns.isEmpty()) {
            return null;
        }
        return String.format(Locale.ROOT, "%s holds %d checkpoint(s) of other runs (%s%s), left alone and passed over",
                checkpoint.getParent(), otherRuns.size(), otherRuns.get(0).getFileName(),
                otherRuns.size() > 1 ? ", ..." : "");
    }

    @Override
    public String toString() {
        return "CheckpointChoice[" + checkpoint + ", step " + step + ", " + otherRuns.size() + " of other runs]";
    }
}
