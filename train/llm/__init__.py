"""LLM fine-tuning with SPD: the commonsense-reasoning recipe (LoRA adapters)."""
