"""Models: Hugging Face loading, generation, the four PPO actors, QLoRA's shared 4-bit base with its adapters, and the
memory estimator.
"""
