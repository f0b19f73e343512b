package ai.djl.memopt.examples.cli;

import ai.djl.Device;
import ai.djl.memopt.gguf.GgufFile;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.stream.Collectors;
import java.util.stream.Stream;

/**
 * The checks {@link FinetuneCommand} makes of its options before any heavy work: their values and combinations, the
 * devices, and an {@code --out} directory that replacing as a whole would lose something in.
 */
final class FinetuneOptionChecks {

    private FinetuneOptionChecks() {}

    /**
     * Refuses a {@code --save} that replacing as a whole would lose something in: a directory holding neither a model,
     * an adapter nor checkpoints, or one that holds the input data or model.
     */
    static void checkSaveTarget(FinetuneCommand c) throws IOException {
        Path target = c.save.toAbsolutePath().normalize();
        for (Path input : new Path[] {c.data, c.source.model, c.tokenizer}) {
            if (input != null && input.toAbsolutePath().normalize().startsWith(target)
                    && !input.toAbsolutePath().normalize().equals(target)) {
                throw new IllegalArgumentException("--out " + c.save + " holds the input " + input + ": fine-tuning"
                        + " replaces the --out directory as a whole; save elsewhere");
            }
        }
        if (!Files.exists(c.save)) {
            return;
        }
        if (!Files.isDirectory(c.save)) {
            throw new IllegalArgumentException("--out " + c.save + " is a file, not a directory");
        }
        List<String> names;
        try (Stream<Path> s = Files.list(c.save)) {
            names = s.map(p -> p.getFileName().toString()).sorted().collect(Collectors.toList());
        }
        boolean output = names.isEmpty() || names.contains("config.json") || names.contains("adapter_config.json")
                || names.contains("checkpoints");
        if (!output) {
            throw new IllegalArgumentException("--out " + c.save + " holds " + names.size() + " file(s) ("
                    + names.get(0) + (names.size() > 1 ? ", ..." : "") + ") but no model, adapter or checkpoints: fine-tuning"
                    + " replaces the --out directory as a whole; give a new or empty directory or an earlier output");
        }
    }

    /** {@code --devices}, else {@code --device} alone; {@code --batch} must split evenly between them. */
    static List<Device> devices(FinetuneCommand c) {
        if (c.devices == null) {
            return List.of(Devices.parse(c.device));
        }
        if (c.spec.commandLine().getParseResult().hasMatchedOption("--device")) {
            throw new IllegalArgumentException("give --device (one device) or --devices (data parallel), not both");
        }
        List<Device> list = Devices.parseList(c.devices, "--devices");
        if (c.batch % list.size() != 0) {
            throw new IllegalArgumentException("--batch " + c.batch + " does not split evenly between the "
                    + list.size() + " --devices " + c.devices + ": give a multiple of " + list.size());
        }
        return list;
    }

    /** The checks of the options that need no file read beyond existence: each error names the option. */
    static void validate(FinetuneCommand c) {
        if (c.source.preset != null && c.tokenizer == null) {
            throw new IllegalArgumentException("--preset needs --tokenizer FILE (a tokenizer.json)");
        }
        if (c.source.model != null && c.tokenizer != null) {
            throw new IllegalArgumentException("--tokenizer is for --preset; --model uses DIR/tokenizer.json");
        }
        if (c.source.model != null && !Files.isDirectory(c.source.model) && !GgufFile.isGguf(c.source.model)) {
            throw new IllegalArgumentException("model directory " + c.source.model + " does not exist");
        }
        ArtifactBase.check(c.source.model, c.loraRank, c.quantize, c.merge);
        positive("--steps", c.steps);
        positive("--batch", c.batch);
        positive("--grad-accum", c.gradAccum);
        positive("--keep-checkpoints", c.keepCheckpoints);
        if (c.lossChunk != null) {
            positive("--loss-chunk", c.lossChunk);
        }
        if (c.seq < 2) {
            throw new IllegalArgumentException("--seq must be at least 2, got " + c.seq);
        }
        if (c.checkpointEvery < 0) {
            throw new IllegalArgumentException("--checkpoint-every must be >= 0, got " + c.checkpointEvery);
        }
        if (!(c.lr > 0) || !Float.isFinite(c.lr)) {
            throw new IllegalArgumentException("--lr must be a positive number, got " + c.lr);
        }
        if (c.warmup < 0 || (c.cosine && c.warmup >= c.steps)) {
            throw new IllegalArgumentException("--warmup must be >= 0 (and below --steps with --cosine), got "
                    + c.warmup);
        }
    }

    private static void positive(String name, int value) {
        if (value < 1) {
            throw new IllegalArgumentException(name + " must be at least 1, got " + value);
        }
    }
}
