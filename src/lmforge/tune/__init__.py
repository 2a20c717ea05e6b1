"""Fine-tuning: SFT data, full fine-tuning and parameter-efficient methods (LoRA, QLoRA, adapters,
prefix tuning, (IA)^3), saved in PEFT's format."""
