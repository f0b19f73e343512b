package ai.djl.memopt;

import static com.tngtech.archunit.lang.syntax.ArchRuleDefinition.noClasses;

import com.tngtech.archunit.core.domain.JavaClasses;
import com.tngtech.archunit.core.importer.ClassFileImporter;
import com.tngtech.archunit.core.importer.ImportOption;
import com.tngtech.archunit.lang.ArchRule;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * The arrows between the packages (issue 16), checked over the compiled main classes: the model knows only
 * {@code nn} (never the decorators that wrap it), and the decorators never reach up into the applications built on
 * them (fine-tuning, export, inference). See docs/design.md, "Packages".
 */
class PackageDependenciesTest {

    private static JavaClasses classes;

    @BeforeAll
    static void importMainClasses() {
        classes = new ClassFileImporter()
                .withImportOption(ImportOption.Predefined.DO_NOT_INCLUDE_TESTS)
                .importPackages("ai.djl.memopt");
    }

    @Test
    void modelDependsOnNoDecorator() {
        ArchRule rule = noClasses().that().resideInAPackage("ai.djl.memopt.model..")
                .should().dependOnClassesThat().resideInAnyPackage(
                        "ai.djl.memopt.quantize..", "ai.djl.memopt.lora..", "ai.djl.memopt.precision..",
                        "ai.djl.memopt.checkpoint..", "ai.djl.memopt.gguf..", "ai.djl.memopt.export..")
                .because("a model is wrapped by the decorators and sees them only through ai.djl.memopt.nn"
                        + " (LinearWeightSource, StackableProjection, BlockDecorator, TypeCasts)");
        rule.check(classes);
    }

    @Test
    void decoratorsDependOnNoApplication() {
        ArchRule rule = noClasses().that().resideInAnyPackage(
                        "ai.djl.memopt.quantize..", "ai.djl.memopt.lora..", "ai.djl.memopt.precision..",
                        "ai.djl.memopt.checkpoint..")
                .should().dependOnClassesThat().resideInAnyPackage(
                        "ai.djl.memopt.finetune..", "ai.djl.memopt.export..", "ai.djl.memopt.inference..",
                        "ai.djl.memopt.gguf..")
                .because("fine-tuning, export (safetensors artifacts and GGUF) and inference are built on the decorators, not the other way round");
        rule.check(classes);
    }
}
