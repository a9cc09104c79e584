"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for full-weight models, under
`trainer=fsdp2` (Lightning's `ModelParallelStrategy`, every process one data-parallel replica).

Units: each decoder layer, all-gathered for its forward and again for its backward; then the rest of the model. A
causal LM's rest (embeddings, final norm, the tied LM head) is its root unit. A scalar-head model is called as
backbone and head apart (`salsa.models.hf.scalar_head_outputs`), so its backbone and its head are two root units. A
trained model's root units stay gathered from forward to backward (FSDP's default); a frozen model reshards every
unit after each forward, as it has no backward.

Every FSDP unit's forward is a collective, so every rank must run the same forward passes. Where ranks differ —
sampling, which stops when a rank's answers have ended, and scoring in row chunks sized by those answers' length —
the model runs `gathered`: all its units all-gathered once before, no collective inside, resharded after.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def fsdp_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch.distributed.fsdp import FSDPModule

    return [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule)]


def is_sharded(model: object) -> bool:
    """Whether `model` holds FSDP2 units."""
    return isinstance(model, nn.Module) and bool(fsdp_units(model))


def frozen(model: nn.Module) -> bool:
    return not any(p.requires_grad for p in model.parameters())


def _reshards_after_forward(name: str, names: list[str], is_frozen: bool) -> bool:
    """A unit inside another (a decoder layer) reshards after its forward; a root unit only when the model is
    frozen."""
    inner = any(other != name and (other == "" or name.startswith(f"{other}.")) for other in names)
    return inner or is_frozen


def shard_model(model: nn.Module, mesh) -> None:
    """Shard a Hugging Face causal LM or scalar-head (`*ForSequenceClassification`) model over the 1-D data-parallel
    `mesh` in place: each decoder layer, then the root units (module docstring). A sharded model is left as it is."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return
    is_frozen = frozen(model)
    backbone = getattr(model, model.base_model_prefix)
    for layer in backbone.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    head = getattr(model, "score", None)  # a scalar head, called apart from the backbone
    for root in [backbone, head] if head is not None else [model]:
        fully_shard(root, mesh=mesh, reshard_after_forward=is_frozen)


def data_parallel_mesh(mesh):
    """The data-parallel dimension of the device mesh Lightning's `ModelParallelStrategy` gives a module (None under
    every other strategy); refused with tensor parallelism, which these models do not implement."""
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"trainer.strategy.tensor_parallel_size={mesh['tensor_parallel'].size()}: the models here are sharded "
            "data-parallel only (FSDP2); set it to 1"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


@contextmanager
def gathered(*models: nn.Module | None) -> Iterator[None]:
    """Run the sharded ones of `models` with all their weights all-gathered, without a collective inside (ranks may
    then run different numbers of forward passes), and reshard them afterwards; nothing for unsharded models."""
    units = []
    for model in models:
        if not is_sharded(model):
            continue
        named, is_frozen = fsdp_units(model), frozen(model)
        names = [n for n, _ in named]
        units += [(unit, _reshards_after_forward(n, names, is_frozen)) for n, unit in named]
    for unit, _ in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, reshard in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


def without_grad(*models: nn.Module | None) -> AbstractContextManager:
    """Inference mode, or plain no-grad where one of `models` is sharded: FSDP2 keeps the buffers it all-gathers
    into, and a buffer made in inference mode could not be written to by the next training step."""
    return torch.no_grad() if any(is_sharded(m) for m in models) else torch.inference_mode()


def without_grad_of(models_of: Callable[[Any], Iterable[nn.Module | None]]) -> Callable:
    """A decorator: the function (or method) runs in `without_grad(*models_of(its first argument))`."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(first, *args, **kwargs):
            with without_grad(*models_of(first)):
                return function(first, *args, **kwargs)

        return run

    return decorate


def save_pretrained(model: nn.Module, path: str | Path) -> None:
    """`model.save_pretrained(path)`. A sharded model's weights are gathered whole onto rank 0's CPU (every rank
    takes part) and rank 0 writes them; the other ranks write nothing."""
    if not is_sharded(model):
        model.save_pretrained(str(path))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        # gathered apart, tied weights (Gemma's LM head is its embedding) no longer share storage: keep one name each
        aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
        model.save_pretrained(str(path), state_dict={k: v for k, v in state.items() if k not in aliases})
