"""Resumable training: a seeded batch plan, atomic checkpoints, and `fit` that picks up where a killed run stopped.

A stage's Lightning *epoch* is one checkpoint interval (`ckpt_every` optimizer steps; one iteration for PPO).
Checkpoints are written at epoch ends, so resuming never depends on restoring an iterator mid-epoch: the batches of
epoch e are a pure function of (seed, e) (`PlanSampler`), and so is per-step randomness (`step_seed`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import Sampler

log = logging.getLogger("salsa")

CKPT_DIR = "checkpoints"
LAST = "last.ckpt"


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed for the randomness of one training step (dropout, sampling): a function of (seed, step, rank) only."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def batch_plan(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Index batches for `epochs` passes over n examples, reshuffled each pass with a seed-derived permutation."""
    plan = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        plan += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return plan


class _EpochSetter:
    """Where Lightning looks for a batch sampler's epoch setter (`batch_sampler.sampler.set_epoch`, before each epoch
    and on resume): forwards it to the plan. Lightning does not call `set_epoch` on the batch sampler itself."""

    def __init__(self, owner: PlanSampler):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class PlanSampler(Sampler[list[int]]):
    """A batch sampler serving a fixed plan `chunk` batches per Lightning epoch: epoch k serves batches
    k·chunk … (k+1)·chunk − 1, so `num_chunks` epochs serve the whole plan once, and a run resumed at epoch k goes
    on where it stopped. Lightning sets the epoch through `self.sampler` (see `_EpochSetter`).

    Under data parallelism every rank takes its own slice of each planned batch.
    """

    def __init__(self, plan: list[list[int]], chunk: int):
        self.plan, self.chunk, self.epoch = plan, chunk, 0
        self.sampler = _EpochSetter(self)

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.plan) / self.chunk)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _epoch_batches(self) -> list[list[int]]:
        """This epoch's planned batches; under data parallelism a last batch too small to give every process a row
        is left out (the config check makes every full batch a multiple of the world size)."""
        _, world = self._rank()
        return [b for b in self.plan[self.epoch * self.chunk : (self.epoch + 1) * self.chunk] if len(b) >= world]

    def __iter__(self):
        rank, world = self._rank()
        for batch in self._epoch_batches():
            yield batch[rank::world]

    def __len__(self) -> int:
        return len(self._epoch_batches())


class AtomicLastCheckpoint(pl.Callback):
    """Every `every_n_epochs` epochs write `last.ckpt` by write-then-rename, so a kill never leaves half a file."""

    def __init__(self, dirpath: str | os.PathLike, every_n_epochs: int = 1):
        self.dirpath, self.every = Path(dirpath), max(1, int(every_n_epochs))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done % self.every and done != trainer.max_epochs:
            return
        tmp = self.dirpath / f"{LAST}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(tmp), weights_only=False)  # optimizer and loop state too: resumable
        if trainer.is_global_zero:
            os.replace(tmp, self.dirpath / LAST)
        trainer.strategy.barrier("atomic-last-checkpoint")


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(epochs completed, optimizer steps) recorded in a Lightning checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt.get("epoch", -1)) + 1, int(ckpt.get("global_step", 0))


def fit_resumable(
    trainer_factory,
    module: pl.LightningModule,
    work: Path,
    stage: str,
    max_epochs: int,
    ckpt_every: int = 1,
    train_dataloaders=None,
    **trainer_kwargs,
) -> pl.Trainer:
    """Fit `module` for `max_epochs` epochs, checkpointing into `work/checkpoints`, resuming from `last.ckpt` if an
    earlier attempt left one. The checkpoints stay until the stage is published (`Context.build` removes them then):
    if a later step of the same stage fails (saving, the held-out loss), the rerun restores the trained weights from
    the last checkpoint instead of training again."""
    ckpt_dir = work / CKPT_DIR
    last = ckpt_dir / LAST
    resume = last if last.is_file() else None
    if resume is not None:
        epochs, steps = checkpoint_position(resume)
        log.info("[%s] resuming from %s: %d of %d epochs done (step %d)", stage, resume, epochs, max_epochs, steps)
    callbacks = [*trainer_kwargs.pop("callbacks", []), AtomicLastCheckpoint(ckpt_dir, ckpt_every)]
    trainer = trainer_factory(max_epochs=max_epochs, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=train_dataloaders, ckpt_path=resume, weights_only=True)
    return trainer
