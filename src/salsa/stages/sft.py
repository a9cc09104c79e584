"""SFT: the soup's ingredients, fine-tuned from one base and differing only by seed (data order, dropout).

`SFTModule` is next-token prediction on target tokens; the tiny base model is pretrained with the same module on
plain documents (every token a target).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from salsa.cache import Entry
from salsa.context import Context, log, plain
from salsa.data import LMDataset, lm_batch
from salsa.functional import lm_token_nll, warmup_cosine
from salsa.guards import check_finite
from salsa.lora import BaseSettings, new_adapter_model, uses_adapters
from salsa.models import load_causal_lm, load_tokenizer
from salsa.training import PlanSampler, batch_plan, fit_resumable, step_seed


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


def sft_val_dataset(ctx: Context, tokenizer) -> LMDataset:
    s = ctx.cfg.sft
    return LMDataset.from_examples(tokenizer, ctx.data.sft_val, s.max_prompt_length, s.max_response_length)


def ingredient_seed(seed: int, replicate: int, index: int) -> int:
    """Seed of SFT ingredient `index` in replicate `replicate`: replicates never share an ingredient."""
    return seed + 1000 * replicate + index


def run_sft(ctx: Context, base: Entry, index: int) -> Entry:
    """SFT ingredient `index`: the base fine-tuned on the demonstrations with seed `sft.seed + index`."""
    cfg = ctx.cfg
    spec = {"base": base.key, "data": plain(cfg.data), "sft": plain(cfg.sft), "index": index}

    def build(work: Path, run_id: str | None) -> dict:
        s = cfg.sft
        seed = ingredient_seed(s.seed, s.get("replicate", 0), index)
        adapters = uses_adapters(cfg.model)
        if adapters:  # a LoRA adapter on the frozen base; the seed also sets its initial A
            pl.seed_everything(seed, workers=True, verbose=False)
            tok, model = new_adapter_model(BaseSettings.from_cfg(cfg.model), ctx.device)
        else:
            tok = load_tokenizer(base.path)
            # dropout is one of the seeds' sources of diversity
            model = load_causal_lm(base.path, attention_dropout=s.attention_dropout)
        train = LMDataset.from_examples(tok, ctx.data.sft_train, s.max_prompt_length, s.max_response_length)
        fit_lm(ctx, model, train, s, tok.pad_token_id, work, run_id, seed, f"sft {index}")
        model.save_pretrained(str(work))
        tok.save_pretrained(str(work))
        val_loss = heldout_loss(model, sft_val_dataset(ctx, tok), tok.pad_token_id)
        log.info("[sft %d] held-out loss %.4f", index, val_loss)
        fmt = "lora" if adapters else "full"
        return {"metrics": {"val_loss": val_loss}, "format": fmt, "base": base.key, "index": index, "seed": seed}

    return ctx.build("sft", spec, build)
