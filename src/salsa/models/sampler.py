"""The compiled sampler's shape policy: a static KV cache and a compiled decode step, with prompt width and cache
length rounded up to buckets so that rollouts of varying prompt width reuse the same compiled graphs.

`generate` compiles the model's forward for the one-token decode steps only when the cache is static (its tensors
keep one shape for the whole call); the prefill stays eager. The compiled graph is specialised on the batch size and
the cache length, so both must repeat across calls for the compile to pay: the batch does by itself (a rollout's
size is fixed), the cache length does once prompt and response widths are bucketed.
"""

from __future__ import annotations

import torch
from transformers import CompileConfig

PROMPT_BUCKET = 32  # left-pad prompts to a multiple of this width (the pipeline's prompts, ≤ 32: one width)
CACHE_BUCKET = 32  # and size the cache to a multiple of this length


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_prompts(
    query: torch.Tensor, query_mask: torch.Tensor, pad_id: int, multiple: int = PROMPT_BUCKET
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (B, P) prompts to the next multiple of `multiple`; the mask's zeros keep the padding out of attention
    and out of the position ids (which generation derives from the mask)."""
    extra = round_up(query.size(1), multiple) - query.size(1)
    if extra == 0:
        return query, query_mask
    pad = query.new_full((query.size(0), extra), pad_id)
    return torch.cat([pad, query], dim=1), torch.cat([torch.zeros_like(pad, dtype=query_mask.dtype), query_mask], 1)


def cache_length(prompt_width: int, max_new_tokens: int, multiple: int = CACHE_BUCKET) -> int:
    """The static cache's length: room for the whole sequence, rounded up so nearby widths share one graph."""
    return round_up(prompt_width + max_new_tokens, multiple)


def compile_config(device: torch.device) -> CompileConfig:
    """How `generate` compiles the decode step. Shapes are static (bucketed), so no dynamic-shape graphs. On CUDA,
    `reduce-overhead` replays the step as a CUDA graph (no per-kernel launch cost); elsewhere CUDA graphs do not
    exist and plain Inductor code is what is on offer. `_compile_all_devices` lets `generate` compile on CPU, which
    it otherwise declines."""
    config = CompileConfig(
        fullgraph=False, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default"
    )
    config._compile_all_devices = True
    return config
