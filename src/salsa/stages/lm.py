"""Language-model training shared by the base, SFT, reward-model and soup stages.

`SFTModule` is next-token prediction on target tokens (the tiny base model is pretrained with it on plain documents,
every token a target); `fit_lm` trains it resumably on a seeded batch plan; `heldout_loss` scores a model on held-out
targets.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from salsa.data.tokens import LMDataset, lm_batch
from salsa.functional import lm_token_nll, warmup_cosine
from salsa.infra.context import Context
from salsa.infra.guards import check_finite
from salsa.infra.training import PlanSampler, batch_plan, fit_resumable, step_seed


class SFTModule(pl.LightningModule):
    """Causal-LM cross-entropy on the target tokens of each sequence (labels = -100 elsewhere)."""

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        total_steps: int = 1,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank))  # dropout: resumable

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, n = lm_token_nll(logits, batch["labels"])
        loss = nll / n.clamp(min=1)
        check_finite({"train/loss": loss}, self.global_step)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=(0.9, 0.95),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, partial(warmup_cosine, warmup=hp.warmup_steps, total=hp.total_steps, min_ratio=hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def planned_loader(dataset, hp, collate, seed: int) -> DataLoader:
    """`hp.epochs` seeded passes over `dataset` in batches of `hp.batch_size`, `hp.ckpt_every` batches per epoch."""
    plan = batch_plan(len(dataset), hp.batch_size, hp.epochs, seed)
    return DataLoader(dataset, batch_sampler=PlanSampler(plan, hp.ckpt_every), collate_fn=collate)


def fit_lm(
    ctx: Context, model, dataset: LMDataset, hp, pad_id: int, work: Path, run_id: str | None, seed: int, stage: str
):
    """Train `model` on `dataset` with SFTModule, resumably; `hp` holds batch_size, epochs, lr, weight_decay,
    warmup_steps and ckpt_every."""
    pl.seed_everything(seed, workers=True, verbose=False)
    loader = planned_loader(dataset, hp, partial(lm_batch, pad_id=pad_id), seed)
    model.train()  # from_pretrained returns eval mode; dropout must be on for training
    module = SFTModule(model, hp.lr, hp.weight_decay, hp.warmup_steps, len(loader.batch_sampler.plan), seed=seed)
    fit_resumable(
        partial(ctx.trainer, work, run_id),
        module,
        work,
        stage,
        loader.batch_sampler.num_chunks,
        train_dataloaders=loader,
        use_distributed_sampler=False,
    )
    return module


@torch.inference_mode()
def heldout_loss(model, dataset: LMDataset, pad_id: int, batch_size: int = 128) -> float:
    """Token-weighted mean cross-entropy of `model` on the target tokens of `dataset`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        batch = lm_batch([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, n = lm_token_nll(logits, batch["labels"])
        total, count = total + nll.item(), count + n.item()
    model.train(was_training)
    return total / max(count, 1)
