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
from salsa.models.sharding import data_parallel_mesh, shard_model, without_grad_of


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
        ignore: tuple[str, ...] = (),  # a subclass's own arguments that are not hyperparameters (models, tensors)
        **extra,  # a subclass's own hyperparameters, saved with these
    ):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model", "ignore", *ignore])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank))

    def configure_model(self) -> None:
        """trainer=fsdp2: shard the model (DPO: the policy and the reference) over the data-parallel processes
        (`salsa.models.sharding`); nothing under any other strategy."""
        mesh = data_parallel_mesh(self.device_mesh)
        if mesh is None:
            return
        if hasattr(self.model, "base_model_prefix"):  # a Hugging Face model
            shard_model(self.model, mesh)
        else:  # the models of an algorithm (`salsa.models.actors.FullActors`)
            self.model.shard(mesh)

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


# bytes per logit while a batch is scored: the model's logits, their float32 copy and cross-entropy's log-softmax
HELDOUT_BYTES_PER_LOGIT = 12
HELDOUT_BUDGET = 2 * 1024**3  # bytes of logits the held-out loss holds at a time


def heldout_batches(
    dataset: LMDataset, vocab: int, max_rows: int = 128, logits_budget: int = HELDOUT_BUDGET
) -> list[tuple[list[int], int]]:
    """Batches for scoring `dataset`: (item indices, positions whose logits are needed).

    Only the positions that predict a target token need logits, so each batch keeps `keep` positions at its end
    (the items are right-padded). Rows are added while rows × keep × vocab logits fit `logits_budget` bytes: at a
    256k vocabulary and 256 target tokens one row's logits are already ~0.8 GB, so big-vocabulary models are scored
    a few rows at a time, and the tiny model 128 rows at a time.
    """
    batches, rows, width, first = [], [], 0, None
    for i in range(len(dataset)):
        context, target = dataset[i]
        w = max(width, len(context) + len(target))
        f = max(1, len(context)) if first is None else min(first, max(1, len(context)))  # position 0 has no logit
        keep = w - f + 1
        if rows and (len(rows) == max_rows or (len(rows) + 1) * keep * vocab * HELDOUT_BYTES_PER_LOGIT > logits_budget):
            batches.append((rows, width - first + 1))
            rows, w, f = [], len(context) + len(target), max(1, len(context))
        rows.append(i)
        width, first = w, f
    if rows:
        batches.append((rows, width - first + 1))
    return batches


@without_grad_of(lambda model: [model])
def heldout_loss(
    model, dataset: LMDataset, pad_id: int, max_rows: int = 128, logits_budget: int = HELDOUT_BUDGET
) -> float:
    """Token-weighted mean cross-entropy of `model` on the target tokens of `dataset`, scored in batches whose
    logits stay within `logits_budget` bytes (`heldout_batches`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    total, count = 0.0, 0
    for rows, keep in heldout_batches(dataset, vocab, max_rows, logits_budget):
        batch = {k: v.to(device) for k, v in lm_batch([dataset[j] for j in rows], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        nll, n = lm_token_nll(logits, batch["labels"][:, -keep:])
        total, count = total + nll.item(), count + n.item()
    model.train(was_training)
    return total / max(count, 1)


def heldout_dataset(ctx: Context, tokenizer) -> LMDataset:
    """The held-out SFT demonstrations, tokenised as SFT trains: what ingredients and soups are scored on."""
    s = ctx.cfg.sft
    return LMDataset.from_examples(tokenizer, ctx.data.sft_val, s.max_prompt_length, s.max_response_length)
