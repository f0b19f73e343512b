package ai.djl.memopt.export;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.nn.BlockTrees;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantScheme;
import ai.djl.memopt.quantize.QuantizedLinear;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.memopt.safetensors.AtomicFiles;
import ai.djl.memopt.testing.ForkedJvm;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.PosixFilePermission;
import java.nio.file.attribute.PosixFilePermissions;
import java.time.Duration;
import java.util.List;
import java.util.Set;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

/**
 * Re-exporting over an existing artifact, killed (as {@code kill -9} would) at every write step in a forked JVM: the
 * directory then holds the old artifact or the new one, complete and loadable, and the next export cleans up.
 */
class ArtifactCrashTest {

    static final Path V3 = Path.of("src/test/resources/fixtures/tiny-deepseek-v3");
    static final Path TOKENIZER = Path.of("src/test/resources/tokenizers/wordlevel-512");

    @TempDir Path tmp;

    /**
     * Forked: quantizes {@code args[0]} (a model directory) with {@code args[2]} ({@code int8}: one file;
     * {@code int4}: int4 g32 sharded at 200 kB) and exports it to {@code args[1]}.
     */
    public static void main(String[] args) throws IOException {
        export(Path.of(args[0]), Path.of(args[1]), args[2]);
    }

    static ArtifactManifest export(Path model, Path out, String scheme) throws IOException {
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = DeepSeekLoader.load(model, m, DataType.FLOAT32);
            boolean int8 = scheme.equals("int8");
            Quantizer.quantize(lm, int8 ? Int8WeightOnlyConfig.builder().build()
                    : Int4WeightOnlyConfig.builder().optGroupSize(32).build());
            ExportOptions.Builder options = ExportOptions.builder().optSourceModel(model);
            if (!int8) {
                options.optMaxShardBytes(200_000);
            }
            return QuantizedArtifact.export(lm, out, options.build());
        }
    }

    /** The V3 fixture with a tokenizer, so that an export also copies companion files. */
    private Path source() throws IOException {
        Path src = Files.createDirectories(tmp.resolve("source"));
        for (String f : new String[] {"config.json", "generation_config.json", "model.safetensors"}) {
            Files.copy(V3.resolve(f), src.resolve(f));
        }
        for (String f : new String[] {"tokenizer.json", "tokenizer_config.json"}) {
            Files.copy(TOKENIZER.resolve(f), src.resolve(f));
        }
        return src;
    }

    /** The scheme of the artifact in {@code dir}, after checking every checksum and loading it as a model. */
    private static QuantScheme loadable(Path dir) throws IOException {
        ArtifactManifest manifest = QuantizedArtifact.verify(dir);
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM lm = QuantizedArtifact.loadDeepSeek(dir, m, DataType.FLOAT32);
            QuantizedLinear o = (QuantizedLinear) BlockTrees.get(lm, "model.layers.0.self_attn.o_proj");
            assertEquals(manifest.layers().get("model.layers.0.self_attn.o_proj").scheme(), o.quantizedWeight().scheme());
            return o.quantizedWeight().scheme();
        }
    }

    private static List<String> names(Path dir) throws IOException {
        try (Stream<Path> s = Files.list(dir)) {
            return s.map(p -> p.getFileName().toString()).sorted().toList();
        }
    }

    @ParameterizedTest
    @CsvSource({
        "export.shard-written#2, old",
        "write-file.written#3, old",
        "export.weights-written, old",
        "export.config-written, old",
        "export.companion-written#2, old",
        "export.manifest-written, old",
        "replace-directory.written, old",
        "replace-directory.ready, old",
        "replace-directory.swapped, new",
        "replace-directory.moved-aside, new",
    })
    void aKillAtEveryWriteStepLeavesTheOldOrTheNewArtifact(String point, String expected) throws Exception {
        Path src = source();
        Path out = Files.createDirectories(tmp.resolve("artifacts")).resolve("q");
        export(src, out, "int8");
        boolean aside = point.endsWith("moved-aside");
        ForkedJvm.Result r = ForkedJvm.run(ArtifactCrashTest.class,
                List.of("-Dmemopt.crashAt=" + point, "-Dmemopt.noRenameExchange=" + aside),
                List.of(src.toString(), out.toString(), "int4"), Duration.ofMinutes(3));
        assertEquals(137, r.exitCode(), r.output());
        assertTrue(r.output().contains("crash point " + point.split("#")[0]), r.output());
        QuantScheme want = expected.equals("old") ? QuantScheme.INT8_WEIGHT_ONLY : QuantScheme.INT4_WEIGHT_ONLY;
        if (!aside) {
            // readers need no recovery: the directory is the old artifact or the new one at every instant
            assertEquals(want, loadable(out), point);
        }
        AtomicFiles.recoverDirectory(out);
        assertEquals(want, loadable(out), point);
        assertEquals(List.of("q"), names(out.getParent()), "recovery leaves no temporary behind");

        // a kill leaves nothing that stops the next run, which replaces the artifact as a whole
        Files.createDirectories(out.getParent().resolve(".q.tmp-stale"));
        export(src, out, "int8");
        assertEquals(QuantScheme.INT8_WEIGHT_ONLY, loadable(out));
        assertEquals(List.of("q"), names(out.getParent()), "stale temporaries are cleaned by the next run");
        assertFalse(names(out).stream().anyMatch(n -> n.startsWith("model-")), "no shard of the int4 export is left");
    }

    @Test
    void refusesToReplaceADirectoryThatHoldsMoreThanAnArtifact() throws IOException {
        Path src = source();
        Path out = tmp.resolve("q");
        export(src, out, "int8");
        Files.writeString(out.resolve("notes.txt"), "mine");
        String m = assertThrows(IOException.class, () -> export(src, out, "int8")).getMessage();
        assertTrue(m.contains("notes.txt") && m.contains("not part of"), m);
        assertEquals("mine", Files.readString(out.resolve("notes.txt")));
        Files.delete(out.resolve("notes.txt"));

        Path other = Files.createDirectories(tmp.resolve("other"));
        Files.writeString(other.resolve("a.txt"), "a");
        String o = assertThrows(IOException.class, () -> export(src, other, "int8")).getMessage();
        assertTrue(o.contains("not empty") && o.contains("a.txt"), o);
        assertEquals(List.of("a.txt"), names(other));

        // an older export killed before its quantization.json, with a temporary file: replaced
        Files.delete(out.resolve("quantization.json"));
        Files.writeString(out.resolve(".model.safetensors.12345.tmp"), "half");
        export(src, out, "int8");
        assertEquals(QuantScheme.INT8_WEIGHT_ONLY, loadable(out));
        assertFalse(names(out).contains(".model.safetensors.12345.tmp"));
    }

    @Test
    void filesHaveTheModeTheFormatDocumentSays() throws IOException {
        Path out = tmp.resolve("q");
        export(source(), out, "int8");
        String doc = Files.readString(Path.of("../docs/artifact-format.md"));
        for (String f : names(out)) {
            Set<PosixFilePermission> p = Files.getPosixFilePermissions(out.resolve(f));
            assertEquals("rw-r--r--", PosixFilePermissions.toString(p), f);
        }
        assertTrue(doc.contains("mode `0644`") && !doc.contains("0600"), "docs/artifact-format.md states another mode");
    }
}
