//! The tutorial's recipe (LoRA fine-tuning of Qwen2.5-7B-Instruct on Chat-甄嬛 with transformers +
//! PEFT), as the defaults of this crate's commands. The loop's half is
//! [`TrainingArguments::tutorial`](crate::TrainingArguments::tutorial).

use lora_core::{LoraConfig, ModuleSelector};

/// The tutorial's targets: every linear projection of a Qwen2/Llama decoder layer.
pub const TUTORIAL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The tutorial's LoRA config: r=8, alpha=32, dropout 0.1 on q,k,v,o,gate,up,down, causal LM.
pub fn lora_config() -> LoraConfig {
    LoraConfig {
        task_type: Some("CAUSAL_LM".into()),
        r: 8,
        lora_alpha: 32.0,
        lora_dropout: 0.1,
        target_modules: Some(ModuleSelector::List(
            TUTORIAL_TARGETS.map(String::from).to_vec(),
        )),
        ..LoraConfig::default()
    }
}
