package ai.djl.memopt.inference;

import static ai.djl.memopt.inference.MlaCachedDecoderTest.fixture;
import static ai.djl.memopt.inference.MlaCachedDecoderTest.stepDifferences;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.Device;
import ai.djl.ndarray.types.DataType;
import java.io.IOException;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.junit.jupiter.api.extension.ExtendWith;

@ExtendWith(OneThread.class)
class ScriptedStageTest {

    @ParameterizedTest
    @ValueSource(strings = {"tiny-deepseek-v3", "tiny-deepseek-v2"})
    void scriptedStepEqualsTheJavaPath(String name) throws IOException {
        Path dir = fixture(name);
        long[][] prompts = {{451, 340, 497, 361}, {-1, -1, 200, 7}};
        long[][] next = {{7, 300, 12, 99, 5, 8}, {41, 3, 250, 18, 77, 6}};
        for (ExpertDispatch experts : List.of(ExpertDispatch.GATHERED, ExpertDispatch.SORTED)) {
            try (TestModel a = TestModel.load(dir, DataType.FLOAT32);
                    TestModel b = TestModel.load(dir, DataType.FLOAT32)) {
                MlaCachedDecoder scripted = new MlaCachedDecoder(a.model(), Device.cpu(), experts, DecodePath.AUTO);
                MlaCachedDecoder java = new MlaCachedDecoder(b.model(), Device.cpu(), experts, DecodePath.JAVA);
                assertEquals(DecodePath.TORCHSCRIPT, scripted.decodePath(), scripted.javaPathReason());
                assertEquals(DecodePath.JAVA, java.decodePath());
                List<Float> diffs = stepDifferences(scripted, java, prompts, next);
                System.out.println(name + " " + experts + " scripted vs Java: " + diffs);
                for (float d : diffs) {
                    assertTrue(d < 1e-5f, name + " " + experts + " scripted vs Java: " + diffs);
                }
            }
        }
    }
}
