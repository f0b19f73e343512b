package ai.djl.memopt.examples.guide;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.jar.Attributes;
import java.util.jar.JarEntry;
import java.util.jar.JarOutputStream;
import java.util.jar.Manifest;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * The user guide's way of using the library in one's own build, followed as a user would: the library as this build
 * made it (its classes and POM, and the parent POM) goes into a private local repository, laid out as
 * {@code mvn install} lays it out, and a separate Maven project whose {@code <dependencies>} are the guide's builds
 * against it and runs. Nothing is downloaded and the shared {@code ~/.m2} is only read: the nested build's settings
 * mirror every repository to it (a {@code file://} URL) and keep their own local repository in a temporary directory.
 */
class ConsumerBuildTest {

    static final Path ROOT = Path.of("..").toAbsolutePath().normalize();
    static final String VERSION = "0.1.0-SNAPSHOT";

    @TempDir Path tmp;

    @Test
    void aProjectWithTheGuidesDependenciesBuildsAndRunsAgainstThisBuild() throws Exception {
        Path repo = Files.createDirectories(tmp.resolve("repo"));
        install(repo);

        Path consumer = tmp.resolve("consumer");
        copyTree(Path.of("src", "test", "resources", "consumer"), consumer);
        String template = Files.readString(consumer.resolve("pom.xml.template"));
        String parentPom = Files.readString(ROOT.resolve("pom.xml"));
        Files.writeString(consumer.resolve("pom.xml"), template.replace("@DEPENDENCIES@", guideDependencies())
                .replace("@COMPILER@", pluginVersion(parentPom, "maven-compiler-plugin"))
                .replace("@RESOURCES@", pluginVersion(parentPom, "maven-resources-plugin")));
        Path outer = Path.of(System.getProperty("memopt.outerRepository",
                Path.of(System.getProperty("user.home"), ".m2", "repository").toString()));
        Files.writeString(tmp.resolve("settings.xml"), "<settings>\n  <localRepository>" + repo
                + "</localRepository>\n  <mirrors>\n    <mirror>\n      <id>this-machine</id>\n"
                + "      <mirrorOf>*</mirrorOf>\n      <url>" + outer.toUri() + "</url>\n    </mirror>\n"
                + "  </mirrors>\n</settings>\n");

        List<String> build = new ArrayList<>(List.of(maven(), "-B", "-ntp", "-q", "-s",
                tmp.resolve("settings.xml").toString(), "-f", consumer.resolve("pom.xml").toString(), "compile"));
        Result compiled = run(build, consumer);
        assertEquals(0, compiled.code, "the consumer project did not build:\n" + compiled.output);
        assertTrue(Files.isRegularFile(repo.resolve("ai/djl/pytorch/pytorch-engine/0.36.0/pytorch-engine-0.36.0.jar")),
                "the library's dependencies were resolved through its POM");

        // run the user's program: its classes, the library jar from the private repository, and the test's
        // class path for the third-party jars (the same ones the POM resolved)
        String cp = consumer.resolve("target/classes") + java.io.File.pathSeparator
                + repo.resolve("ai/djl/memopt/djl-memopt/" + VERSION + "/djl-memopt-" + VERSION + ".jar")
                + java.io.File.pathSeparator + System.getProperty("java.class.path");
        Result ran = run(List.of(Path.of(System.getProperty("java.home"), "bin", "java").toString(),
                "-Dai.djl.offline=true", "-cp", cp, "com.example.QuantizeMyModel"), consumer);
        assertEquals(0, ran.code, ran.output);
        assertTrue(ran.output.contains("quantized 2 layers"), ran.output);
    }

    /**
     * Lays out the library as {@code mvn install} does: the parent POM, and the library's POM and a jar of the classes
     * this build compiled ({@code djl-memopt/target/classes}, present in every reactor build that reaches this test).
     */
    static void install(Path repo) throws IOException {
        Path parentDir = Files.createDirectories(repo.resolve("ai/djl/memopt/djl-memopt-parent/" + VERSION));
        Files.copy(ROOT.resolve("pom.xml"), parentDir.resolve("djl-memopt-parent-" + VERSION + ".pom"));
        Path libDir = Files.createDirectories(repo.resolve("ai/djl/memopt/djl-memopt/" + VERSION));
        Files.copy(ROOT.resolve("djl-memopt/pom.xml"), libDir.resolve("djl-memopt-" + VERSION + ".pom"));
        Path classes = ROOT.resolve("djl-memopt/target/classes");
        assertTrue(Files.isDirectory(classes.resolve("ai/djl/memopt")), "the library's classes: " + classes);
        Manifest manifest = new Manifest();
        manifest.getMainAttributes().put(Attributes.Name.MANIFEST_VERSION, "1.0");
        try (OutputStream os = Files.newOutputStream(libDir.resolve("djl-memopt-" + VERSION + ".jar"));
                JarOutputStream jar = new JarOutputStream(os, manifest);
                Stream<Path> files = Files.walk(classes)) {
            for (Path f : (Iterable<Path>) files.filter(Files::isRegularFile).sorted()::iterator) {
                jar.putNextEntry(new JarEntry(classes.relativize(f).toString().replace('\\', '/')));
                Files.copy(f, jar);
                jar.closeEntry();
            }
        }
    }

    /** The {@code <dependencies>} block the user guide tells users to add (after {@code <!-- consumer-dependencies -->}). */
    static String guideDependencies() throws IOException {
        String guide = Files.readString(GuideDocs.GUIDE, StandardCharsets.UTF_8);
        Matcher m = Pattern.compile("<!-- consumer-dependencies -->\\n```xml\\n(.*?)```", Pattern.DOTALL)
                .matcher(guide);
        assertTrue(m.find(), "the guide's dependency block (after <!-- consumer-dependencies -->)");
        return m.group(1);
    }

    private static String pluginVersion(String pom, String artifactId) {
        Matcher m = Pattern.compile("<artifactId>" + artifactId + "</artifactId>\\s*<version>([^<]+)</version>")
                .matcher(pom);
        assertTrue(m.find(), artifactId + " in the parent POM");
        return m.group(1);
    }

    /** The Maven of the build running this test, else {@code mvn} on the PATH. */
    private static String maven() {
        String home = System.getProperty("maven.home");
        if (home != null && Files.isExecutable(Path.of(home, "bin", "mvn"))) {
            return Path.of(home, "bin", "mvn").toString();
        }
        return "mvn";
    }

    private record Result(int code, String output) {}

    private static Result run(List<String> command, Path dir) throws IOException, InterruptedException {
        ProcessBuilder pb = new ProcessBuilder(command).directory(dir.toFile()).redirectErrorStream(true);
        pb.environment().remove("MAVEN_OPTS");
        Process p = pb.start();
        byte[][] out = new byte[1][];
        Thread reader = new Thread(() -> {
            try {
                out[0] = p.getInputStream().readAllBytes();
            } catch (IOException e) {
                out[0] = new byte[0];
            }
        });
        reader.start();
        if (!p.waitFor(10, TimeUnit.MINUTES)) {
            p.destroyForcibly();
        }
        reader.join();
        return new Result(p.isAlive() ? -1 : p.exitValue(), new String(out[0], StandardCharsets.UTF_8));
    }

    private static void copyTree(Path from, Path to) throws IOException {
        try (Stream<Path> s = Files.walk(from)) {
            for (Path f : (Iterable<Path>) s::iterator) {
                Path target = to.resolve(from.relativize(f).toString());
                if (Files.isDirectory(f)) {
                    Files.createDirectories(target);
                } else {
                    Files.copy(f, target);
                }
            }
        }
    }
}
