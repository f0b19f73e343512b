package ai.djl.memopt.lora;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import ai.djl.memopt.model.deepseek.DeepSeekForCausalLM;
import ai.djl.memopt.model.deepseek.DeepSeekLoader;
import ai.djl.memopt.quantize.Int4WeightOnlyConfig;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import org.junit.jupiter.api.Test;

/** The trainable-parameter line of QLoRA counts the quantized base as weights, as plain LoRA does, not as bytes. */
class QLoraReportTest {

    @Test
    void qloraCountsTheSameParametersAsLoraOnTheFloatModel() throws Exception {
        LoraConfig config = LoraConfig.builder().setRank(4).optTargetModules("q_a_proj", "o_proj").build();
        try (NDManager m = NDManager.newBaseManager()) {
            DeepSeekForCausalLM plain = DeepSeekLoader.load(QLoraTest.MODEL, m, DataType.FLOAT32);
            LoraReport lora = Lora.apply(plain, config);
            DeepSeekForCausalLM quantized = DeepSeekLoader.load(QLoraTest.MODEL, m, DataType.FLOAT32);
            Quantizer.quantize(quantized, Int4WeightOnlyConfig.builder().optGroupSize(32).build());
            LoraReport qlora = Lora.apply(quantized, config);
            assertEquals(lora.trainableParameters(), qlora.trainableParameters());
            assertEquals(lora.totalParameters(), qlora.totalParameters(), qlora.toString());
            assertTrue(qlora.trainableFraction() < 0.05, qlora.toString());
        }
    }
}
