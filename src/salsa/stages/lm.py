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


class SeededModule(pl.LightningModule):
    """What the SFT and reward-model modules share: a seed per optimizer step (dropout replays the same after a
    resume), and AdamW (β = 0.9, 0.95) with linear warmup and cosine decay, stepped per batch. Subclasses save `lr`,
    `weight_decay`, `warmup_steps`, `total_steps` and `seed` (optionally `min_lr_ratio`) as hyperparameters."""

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        total_steps: int = 1,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
        **extra,  # a subclass's own hyperparameters, saved with these
    ):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank))

    def param_groups(self) -> list[dict]:
        """Every trainable parameter (adapters only, on a frozen base), with the configured weight decay."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.hparams.weight_decay}]

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=(0.9, 0.95))
        schedule = partial(
            warmup_cosine, warmup=hp.warmup_steps, total=hp.total_steps, min_ratio=hp.get("min_lr_ratio", 0.1)
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SFTModule(SeededModule):
    """Causal-LM cross-entropy on the target tokens of each sequence (labels = -100 elsewhere)."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, n = lm_token_nll(logits, batch["labels"])
        loss = nll / n.clamp(min=1)
        check_finite({"train/loss": loss}, self.global_step)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def param_groups(self) -> list[dict]:
        """Weight decay on matrices only (not on norms and biases)."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]


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
    total = len(loader.batch_sampler.plan)
    module = SFTModule(model, hp.lr, hp.weight_decay, hp.warmup_steps, total, seed=seed)
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


def heldout_dataset(ctx: Context, tokenizer) -> LMDataset:
    """The held-out SFT demonstrations, tokenised as SFT trains: what ingredients and soups are scored on."""
    s = ctx.cfg.sft
    return LMDataset.from_examples(tokenizer, ctx.data.sft_val, s.max_prompt_length, s.max_response_length)
