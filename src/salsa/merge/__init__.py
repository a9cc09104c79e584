"""Model merging: soups of full checkpoints and of LoRA adapters."""
