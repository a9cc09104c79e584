"""The pipeline's stages, one module each: `base`, `sft`, `soup`, `rm`, `ppo` (and the runner of every online
algorithm), `group` (GRPO, RLOO), `dpo`, `evaluate`, `export` and `landscape`, with `lm`, the language-model training
the base, SFT, reward-model, DPO and soup stages share. Each stage keys its output in the stage cache and builds it
on a miss; `salsa.pipeline` calls them in order.
"""
