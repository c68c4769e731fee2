"""Visual question answering with SPD: PaliGemma LoRA on VQAv2 (issue 26)."""
