"""Fine-tuning: LoRA adapters on the native model, saved in PEFT's format, merged into the base weights."""
