"""LLM fine-tuning with SPD: the commonsense recipe (LoRA adapters)."""
