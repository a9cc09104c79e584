"""Which process this is under DDP, and how rank 0 tells the other ranks what it decided.

Lightning's DDP launcher re-runs the whole command for ranks 1..N-1 when rank 0 first calls `fit`, and torchrun or
SLURM start every rank at once; either way every rank runs the whole pipeline. Rank 0 owns the stage cache: it builds
and publishes. The other ranks join each build that trains (its collectives need every rank) in a scratch
directory, publish nothing, and afterwards read what rank 0 published (see `salsa.infra.context.Context.build`).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

RANK_VARIABLES = ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID")


def is_global_zero() -> bool:
    """True unless a launcher marked this process as another rank (Lightning, torchrun and SLURM set these)."""
    return all(int(os.environ.get(v) or 0) == 0 for v in RANK_VARIABLES)


def rank_name() -> str:
    """A label for this process in file names: the global rank when known, else node and local rank."""
    if os.environ.get("RANK"):
        return os.environ["RANK"]
    return f"{os.environ.get('NODE_RANK', 0)}-{os.environ.get('LOCAL_RANK', 0)}"


def connected() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_from_zero(value: Any = None) -> Any:
    """Rank 0's `value` on every rank (only once the process group exists)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if connected():
        dist.barrier()


def deepspeed_strategy(name: str, clip_norm: float):
    """Lightning's DeepSpeed strategy `name` (`deepspeed`, `deepspeed_stage_2`, ...) with its engine clipping the
    gradient norm to `clip_norm`.

    PPO, GRPO and RLOO optimise manually, so they cannot hand the Trainer a clip value, and their own
    `clip_gradients` call is a no-op under DeepSpeed (the engine steps the optimizer). Left alone, Lightning would
    write `gradient_clipping: 0.0` into the engine's config and train without clipping; a value already in the
    config is kept, so this one is."""
    from pytorch_lightning.strategies import StrategyRegistry

    if name not in StrategyRegistry or "deepspeed" not in name:
        raise ValueError(f"{name!r} is not one of Lightning's DeepSpeed strategies")
    entry = StrategyRegistry[name]
    strategy = entry["strategy"](**entry["init_params"])
    strategy.config["gradient_clipping"] = float(clip_norm)
    return strategy
