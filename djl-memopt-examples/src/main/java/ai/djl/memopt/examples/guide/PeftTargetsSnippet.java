package ai.djl.memopt.examples.guide;

import ai.djl.memopt.lora.Lora;
import ai.djl.memopt.lora.LoraConfig;
import ai.djl.memopt.lora.LoraReport;
import ai.djl.nn.Block;

/** The guide's snippet on LoRA targets that mean the same in Hugging Face PEFT. */
public final class PeftTargetsSnippet {

    private PeftTargetsSnippet() {}

    // guide:begin
    /** Adapts a DeepSeek model's attention, dense MLPs and shared experts, with the targets PEFT reads the same way. */
    public static LoraReport adaptAttentionAndMlp(Block deepSeek) {
        LoraConfig config = LoraConfig.builder().setRank(8).optAlpha(16)
                .optTargetModules("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj") // attention
                .optTargetParameters("gate_proj.weight", "up_proj.weight", "down_proj.weight") // dense + shared MLP
                .build();
        return Lora.apply(deepSeek, config);
    }
    // guide:end
}
