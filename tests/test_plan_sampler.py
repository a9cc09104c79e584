"""A planned loader serves its whole plan once through Lightning, chunk by chunk, and a resumed fit goes on where it
stopped (pretraining, SFT and the reward model all train through it)."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from salsa.infra.training import PlanSampler, fit_resumable


class _Recorder(pl.LightningModule):
    """Records the rows of every batch it trains on; fails at the start of epoch `fail_at` if set."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []
        self.fail_at = fail_at

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.fail_at:
            raise RuntimeError("killed")

    def training_step(self, batch, batch_idx: int):
        self.seen.append(batch.tolist())
        return (self.w * batch.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, **kwargs,
    )  # fmt: skip


def _loader(plan: list[list[int]], chunk: int) -> DataLoader:
    return DataLoader(list(range(100)), batch_sampler=PlanSampler(plan, chunk))


PLAN = [[i, i + 50] for i in range(10)]  # ten batches of two rows, served three per Lightning epoch (4 epochs)


def test_lightning_is_served_every_planned_batch_once_in_order():
    loader = _loader(PLAN, 3)
    assert loader.batch_sampler.num_chunks == 4
    module = _Recorder()
    _trainer(max_epochs=loader.batch_sampler.num_chunks).fit(module, loader)
    assert module.seen == PLAN  # not the first chunk four times


def test_a_resumed_fit_serves_the_rest_of_the_plan(tmp_path):
    first = _Recorder(fail_at=2)
    with pytest.raises(RuntimeError, match="killed"):
        fit_resumable(_trainer, first, tmp_path, "test", 4, train_dataloaders=_loader(PLAN, 3))
    assert first.seen == PLAN[:6]  # two epochs (chunks) done and checkpointed
    second = _Recorder()
    fit_resumable(partial(_trainer), second, tmp_path, "test", 4, train_dataloaders=_loader(PLAN, 3))
    assert second.seen == PLAN[6:]
