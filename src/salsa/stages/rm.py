"""Reward model: a Bradley–Terry scalar head on the base LM, trained on preference pairs."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from salsa.data.synthetic import Pair
from salsa.data.tokens import pad_right, pair_ids
from salsa.errors import ConfigError
from salsa.functional import bradley_terry_loss, unit_scale
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.infra.guards import check_finite
from salsa.infra.training import fit_resumable
from salsa.models.hf import load_reward_model, load_tokenizer, scale_score_head, sequence_scores
from salsa.models.qlora import new_adapter_model, uses_adapters
from salsa.models.sharding import save_pretrained
from salsa.stages.base import base_settings
from salsa.stages.lm import SeededModule, planned_loader
from salsa.validate import check_rm_score


class PairDataset(Dataset):
    """(chosen ids, rejected ids, gold margin, prompt length) for each pair; the gold margin is NaN when no judge
    exists."""

    def __init__(self, tokenizer, pairs: list[Pair], max_prompt: int, max_response: int):
        self.items = []
        for p in pairs:
            context, chosen, rejected = pair_ids(tokenizer, p, max_prompt, max_response)
            margin = p.gold_margin if p.gold_margin is not None else float("nan")
            self.items.append((context + chosen, context + rejected, margin, len(context)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def pair_batch(items, pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: one forward pass scores both. `response_mask` marks each row's
    response tokens (for `rm.score=mean`)."""
    seqs = [c for c, _, _, _ in items] + [r for _, r, _, _ in items]
    prompt = [n for *_, n in items] * 2
    return {
        "input_ids": pad_right(seqs, pad_id),
        "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
        "response_mask": pad_right([[0] * n + [1] * (len(s) - n) for s, n in zip(seqs, prompt, strict=True)], 0),
        "gold_margin": torch.tensor([m for _, _, m, _ in items], dtype=torch.float32),
    }


class RewardModule(SeededModule):
    """−log σ(r_chosen − r_rejected) (+ optional centering); accuracy on held-out labels and against the gold.
    `head_lr`: the scalar head's own learning rate (None: `lr`, like the rest of the model)."""

    def __init__(
        self, model: torch.nn.Module, lr: float, center_coef: float = 0.0, head_lr: float | None = None, **optimizer
    ):
        super().__init__(model, lr, center_coef=center_coef, head_lr=head_lr, **optimizer)
        self.val_accuracy = BinaryAccuracy()
        self.val_gold_agreement = BinaryAccuracy()
        self.val_score = MeanMetric()  # E[s] and E[s²] over every held-out answer, chosen and rejected
        self.val_score_square = MeanMetric()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = sequence_scores(self.model, batch["input_ids"], batch["attention_mask"], batch.get("response_mask"))
        return scores.chunk(2)

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        head_lr = self.hparams.get("head_lr")
        if head_lr is None or not hasattr(self.model, "score"):
            return groups
        head = {id(p) for p in self.model.score.parameters()}
        body = [p for p in groups[0]["params"] if id(p) not in head]
        own = [p for p in groups[0]["params"] if id(p) in head]
        decay = self.hparams.weight_decay
        return [{"params": body, "weight_decay": decay}, {"params": own, "weight_decay": decay, "lr": float(head_lr)}]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        r_chosen, r_rejected = self(batch)
        loss = bradley_terry_loss(r_chosen, r_rejected, self.hparams.center_coef)
        check_finite({"rm/score": torch.cat([r_chosen, r_rejected]), "train/loss": loss}, self.global_step)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/accuracy", (r_chosen > r_rejected).float().mean(), sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        r_chosen, r_rejected = self(batch)
        self.log("val/loss", bradley_terry_loss(r_chosen, r_rejected), batch_size=r_chosen.numel(), sync_dist=True)
        prob = torch.sigmoid(r_chosen - r_rejected)
        self.val_accuracy(prob, torch.ones_like(prob, dtype=torch.long))
        self.log("val/accuracy", self.val_accuracy)
        scores = torch.cat([r_chosen, r_rejected]).float()
        self.val_score(scores)
        self.val_score_square(scores**2)
        self.log("val/score_mean", self.val_score)
        self.log("val/score_mean_square", self.val_score_square)
        margin = batch["gold_margin"]
        known = ~torch.isnan(margin)
        if known.any():
            self.val_gold_agreement(prob[known], (margin[known] > 0).long())
            self.log("val/gold_agreement", self.val_gold_agreement)


def judge_kind(cfg, data) -> str:
    """`eval.judge` with `auto` resolved: the gold reward where the task has one, else a held-out reward model."""
    judge = str(cfg.eval.judge)
    if judge == "auto":
        return "gold" if data.judge is not None else "heldout_rm"
    if judge == "gold" and data.judge is None:
        raise ConfigError("eval.judge", f"gold needs a task with a gold reward; data={cfg.data.name} has none")
    return judge


def reward_pairs(ctx: Context, role: str) -> tuple[list, dict[str, Any]]:
    """The training pairs of the policy's reward model (`role="policy"`) or of the judge (`"judge"`), and what keys
    the split. With a held-out judge the pairs are cut in two: the judge's share is never seen by the policy's
    reward model, so the judge does not share its blind spots (the policy learns to exploit exactly those)."""
    pairs = ctx.data.pairs_train
    if judge_kind(ctx.cfg, ctx.data) != "heldout_rm":
        return pairs, {}
    cut = round(len(pairs) * (1 - float(ctx.cfg.eval.judge_share)))
    if not 0 < cut < len(pairs):
        raise ConfigError("eval.judge_share", f"leaves one side of {len(pairs)} training pairs empty")
    return (pairs[:cut], {"pairs": [0, cut]}) if role == "policy" else (pairs[cut:], {"pairs": [cut, len(pairs)]})


def rm_settings(cfg) -> dict:
    """`rm.*` as it keys one reward model: without `members`, which says how many there are, not how each trains,
    and without `score`/`head_lr` at their defaults (last token, one learning rate), so a default reward model's key
    does not depend on settings it does not use."""
    settings = plain(cfg.rm)
    settings.pop("members", None)
    if settings.get("score", "last") == "last":
        settings.pop("score", None)
    if settings.get("head_lr") is None:
        settings.pop("head_lr", None)
    return settings


def heldout_pairs(
    ctx: Context, module: RewardModule, tok, work: Path, run_id: str | None, pairs: list | None = None
) -> dict[str, float]:
    """A reward model's held-out pair accuracy, agreement with the gold reward (where known) and loss, on `pairs`
    (the task's held-out pairs by default)."""
    r = ctx.cfg.rm
    val = PairDataset(tok, ctx.data.pairs_val if pairs is None else pairs, r.max_prompt_length, r.max_response_length)
    loader = DataLoader(val, batch_size=r.val_batch_size, collate_fn=partial(pair_batch, pad_id=tok.pad_token_id))
    metrics = ctx.trainer(work, run_id, logger=False).validate(module, loader, verbose=False)[0]
    return {k.removeprefix("val/"): float(v) for k, v in metrics.items()}


def shuffled_prompt_accuracy(ctx: Context, module: RewardModule, tok, work: Path, run_id: str | None) -> float:
    """Held-out pair accuracy when each pair is scored after another pair's prompt (`mismatched`): as high as with
    the own prompts for a reward model that judges answers without reading the question."""
    from salsa.models.prompt_use import mismatched

    pairs = ctx.data.pairs_val
    prompts = mismatched([p.prompt for p in pairs], seed=0)
    shuffled = [dataclasses.replace(p, prompt=q) for p, q in zip(pairs, prompts, strict=True)]
    return heldout_pairs(ctx, module, tok, work, run_id, shuffled)["accuracy"]


OFFSET_WARNING = 3.0  # normalised held-out mean (in s.d.) past which `score_metrics` warns


def score_metrics(model, metrics: dict[str, float], normalize: bool, label: str) -> dict[str, float]:
    """The held-out metrics (`heldout_pairs`) as the manifest keeps them, with the scores' raw s.d. and mean in place
    of their moments. `normalize` (`rm.normalize`) also scales the scalar head so the scores have unit s.d. over the
    held-out answers. The scale is folded into the weights, so every reader of the checkpoint (PPO's rewards and its
    value model's start, GRPO/RLOO, the evaluation, an exported engine) gets the normalised reward, and the KL
    coefficient weighs the same against every reward model. The mean is not moved (the head has no bias): the
    centring term of training keeps it small, and a constant added to every reward leaves the KL-regularised optimum
    unchanged. A mean far from zero in s.d. is warned about."""
    mean, square = metrics.pop("score_mean"), metrics.pop("score_mean_square")
    if not normalize:
        return {**metrics, "raw_score_sd": max(square - mean**2, 0.0) ** 0.5, "score_mean": mean}
    try:
        scale = unit_scale(mean, square)
    except ValueError as e:
        raise RuntimeError(f"[{label}] cannot normalise the reward model: its held-out {e}; set rm.normalize=false "
                           "to keep its raw scores") from None  # fmt: skip
    scale_score_head(model, scale)
    log.info("[%s] scores scaled by %.4g to unit s.d. on held-out answers (raw s.d. %.4g, mean %.4g)", label, scale,
             1 / scale, mean)  # fmt: skip
    if abs(mean * scale) > OFFSET_WARNING:
        log.warning("[%s] the reward model barely separates answers: its held-out scores spread %.3g around %.3g, so "
                    "normalised they sit %.0f s.d. from zero (train it longer, or rm.normalize=false)", label,
                    1 / scale, mean, mean * scale)  # fmt: skip
    return {**metrics, "raw_score_sd": 1 / scale, "reward_scale": scale, "score_mean": mean * scale}


def run_rm(ctx: Context, base: Entry, role: str = "policy", member: int = 0) -> Entry:
    """The reward model the policy is trained against (`role="policy"`), or the held-out judge (`"judge"`: another
    seed, the other share of the pairs); `member` i > 0 of a reward-model soup trains with seed rm.seed + 1000·i."""
    cfg = ctx.cfg
    score = check_rm_score(cfg)
    pairs, split = reward_pairs(ctx, role)
    seed = int(cfg.rm.seed) + (1 if role == "judge" else 0) + 1000 * member
    spec = {"base": base.key, "data": plain(cfg.data), "rm": rm_settings(cfg), **split}
    if role == "judge":
        spec["seed"] = seed
    if member:
        spec["member"] = member

    def build(work: Path, run_id: str | None) -> dict:
        r = cfg.rm
        pl.seed_everything(seed, workers=True, verbose=False)
        adapter = None
        if uses_adapters(cfg.model):  # a LoRA adapter + scalar head on the frozen base (saved as one peft adapter)
            tok, adapter = new_adapter_model(base_settings(ctx), ctx.device, scalar_head=True)
            model = adapter.get_base_model()  # called directly: scores come from its backbone
        else:
            tok = load_tokenizer(base.path)
            model = load_reward_model(base.path)
        model.config.pad_token_id = tok.pad_token_id
        if score != "last":  # saved in config.json: every later reader scores the way the model was trained
            model.config.score_pooling = score
        model.train()
        train = PairDataset(tok, pairs, r.max_prompt_length, r.max_response_length)
        collate = partial(pair_batch, pad_id=tok.pad_token_id)
        loader = planned_loader(train, r, collate, seed)
        total = len(loader.batch_sampler.plan)
        module = RewardModule(
            model, r.lr, r.center_coef, head_lr=r.get("head_lr"), weight_decay=r.weight_decay,
            warmup_steps=r.warmup_steps, total_steps=total, seed=seed,
        )  # fmt: skip
        fit_resumable(
            partial(ctx.trainer, work, run_id),
            module,
            work,
            "rm" if role == "policy" else "judge rm",
            loader.batch_sampler.num_chunks,
            train_dataloaders=loader,
            use_distributed_sampler=False,
            limit_val_batches=0,
        )
        label = "rm" if role == "policy" else "judge rm"
        metrics = score_metrics(model, heldout_pairs(ctx, module, tok, work, run_id), bool(r.normalize), label)
        metrics["accuracy_shuffled_prompts"] = shuffled_prompt_accuracy(ctx, module, tok, work, run_id)
        save_pretrained(adapter or model, work)  # a sharded model (trainer=fsdp2) gathered, and written by rank 0
        tok.save_pretrained(str(work))
        log.info(
            "[%s] held-out pair accuracy %.3f (%.3f with shuffled prompts), agreement with gold %s (%d training pairs)",
            label,
            metrics["accuracy"],
            metrics["accuracy_shuffled_prompts"],
            "n/a" if metrics.get("gold_agreement") is None else f"{metrics['gold_agreement']:.3f}",
            len(pairs),
        )
        return {
            "metrics": metrics, "format": "lora" if adapter else "full", "base": base.key, "role": role,
            "member": member, "score": score,
        }  # fmt: skip

    return ctx.build("rm", spec, build)


def run_rm_soup(ctx: Context, members: list[Entry]) -> Entry:
    """The uniform weight average of reward models trained with different seeds (WARM, Ramé et al. 2024), with its
    held-out pair accuracy and gold agreement beside each member's."""
    from salsa.merge.soup import soup_checkpoints

    cfg = ctx.cfg
    spec = {"members": [e.key for e in members], "data": plain(cfg.data), "rm": rm_settings(cfg)}

    def build(work: Path, run_id: str | None) -> dict:
        if any(e.manifest.get("format") != "full" for e in members):
            raise ConfigError("rm.members", "reward-model soups need full-weight reward models (the embedded model)")
        soup_checkpoints([e.path for e in members], work, None)
        tok = load_tokenizer(members[0].path)
        tok.save_pretrained(str(work))
        model = load_reward_model(work)
        model.config.pad_token_id = tok.pad_token_id
        metrics = heldout_pairs(ctx, RewardModule(model, lr=cfg.rm.lr), tok, work, run_id)
        # an average of unit-scale members need not have a unit scale: normalised again
        metrics = score_metrics(model, metrics, bool(cfg.rm.normalize), "rm soup")
        if cfg.rm.normalize:
            model.save_pretrained(str(work))
        for i, e in enumerate(members):
            for k in ("accuracy", "gold_agreement"):
                if k in e.manifest.get("metrics", {}):
                    metrics[f"member{i}_{k}"] = e.manifest["metrics"][k]
        per_member = {k: round(v, 3) for k, v in metrics.items() if k.startswith("member")}
        log.info("[rm soup] held-out pair accuracy %.3f, agreement with gold %s (members: %s)", metrics["accuracy"],
                 metrics.get("gold_agreement"), per_member)  # fmt: skip
        return {
            "metrics": metrics, "format": "full", "base": members[0].manifest.get("base"), "role": "policy",
            "score": members[0].manifest.get("score", "last"),
        }  # fmt: skip

    return ctx.build("rm_soup", spec, build)


def reward_model(ctx: Context, base: Entry) -> Entry:
    """The reward model the policy is trained against: one (`rm=default`), or the soup of `rm.members` (`rm=soup`)."""
    n = int(ctx.cfg.rm.get("members", 1))
    if n == 1:
        return run_rm(ctx, base)
    return run_rm_soup(ctx, [run_rm(ctx, base, member=i) for i in range(n)])
