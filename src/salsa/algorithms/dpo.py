"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) against a frozen reference — an SFT model, πother or a soup.

Offline: the policy learns from the preference pairs directly, with no reward model and no sampling.
  1. reference  log π_ref(chosen) and log π_ref(rejected) of every pair, computed once (`pair_logprobs`); the
                stage keeps them in its directory, so a resumed run does not score them again
  2. update     per batch: the policy's sequence log-probabilities of both answers (one forward pass, chosen rows
                then rejected rows), and the loss of `salsa.functional.dpo_loss`
Where the policy starts at the reference (`ref=sft`, `soup2`, `soup3`), the loss of every pair is log 2 at step 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from salsa.algorithms.reference import MovingReference, keep_trainable
from salsa.config import DPOConfig
from salsa.data.tokens import lm_batch, pair_ids
from salsa.functional import dpo_loss, sequence_logprobs
from salsa.infra.guards import check_finite
from salsa.models.actors import FullActors
from salsa.stages.lm import SeededModule

__all__ = ["DPOConfig", "DPOModule", "PreferenceDataset", "heldout_preferences", "pair_logprobs", "preference_batch"]


class PreferenceDataset(Dataset):
    """(index, prompt ids, chosen ids, rejected ids) of each pair: the index finds its reference log-probabilities."""

    def __init__(self, tokenizer, pairs: Sequence, max_prompt: int, max_response: int):
        self.items = [(i, *pair_ids(tokenizer, p, max_prompt, max_response)) for i, p in enumerate(pairs)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def preference_batch(items, pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows, then rejected rows, right-padded; labels only on the answers' tokens."""
    batch = lm_batch([(c, a) for _, c, a, _ in items] + [(c, r) for _, c, _, r in items], pad_id)
    batch["index"] = torch.tensor([i for i, *_ in items])
    return batch


def answer_logprobs(logits_of: Callable, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens under `logits_of(ids, mask, first)` (an actor's
    `policy_logits` or `reference_logits`), whose LM head runs only from the first answer token of the batch on."""
    labels = batch["labels"]
    first = int((labels != -100).float().argmax(1).min().clamp(min=1))
    logits = logits_of(batch["input_ids"], batch["attention_mask"], first)
    return sequence_logprobs(logits, labels[:, first:])


@torch.no_grad()  # not inference mode: the policy's held-out pairs may be scored on sharded weights (trainer=fsdp2)
def pair_logprobs(
    logits_of: Callable, dataset: PreferenceDataset, pad_id: int, batch_size: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities of every pair, in dataset order, under `logits_of` (the
    reference's to cache them, the policy's to score held-out pairs)."""
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in preference_batch(items, pad_id).items()}
        c, r = answer_logprobs(logits_of, batch).float().chunk(2)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


class DPOModule(SeededModule):
    """The DPO (or IPO) loss on each batch of pairs, against the reference log-probabilities given at start."""

    def __init__(
        self,
        actors: FullActors,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
        config: DPOConfig,
        total_steps: int,
        moving: MovingReference | None = None,
    ):
        super().__init__(
            actors, config.lr, config.weight_decay, config.warmup_steps, total_steps, seed=config.seed,
            beta=config.beta, loss_type=config.loss_type,
            ignore=("actors", "ref_chosen", "ref_rejected", "config", "moving"),
        )  # fmt: skip
        # plain CPU tensors, not buffers: DDP would broadcast buffers every step, and these were made in inference
        # mode (a clone outside it is an ordinary tensor)
        self.ref_chosen, self.ref_rejected = ref_chosen.clone().cpu(), ref_rejected.clone().cpu()
        self.strict_loading = False  # checkpoints hold only the trainable weights
        # ref.update: ema | sync — the reference then moves, and is scored per batch instead of once
        self.moving = moving if moving is not None and moving.moving else None
        self.first_losses: torch.Tensor | None = None  # every pair's loss in the first step (log 2 if π = π_ref)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        policy_chosen, policy_rejected = answer_logprobs(self.model.policy_logits, batch).chunk(2)
        if self.moving is None:
            idx = batch["index"].cpu()
            ref_chosen, ref_rejected = self.ref_chosen[idx].to(self.device), self.ref_rejected[idx].to(self.device)
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = answer_logprobs(self.model.reference_logits, batch).float().chunk(2)
        losses, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, hp.beta, hp.loss_type)
        if self.global_step == 0 and self.first_losses is None:
            self.first_losses = losses.detach().cpu()
        loss = losses.mean()
        check_finite({"dpo/loss": loss}, self.global_step)
        self.log("dpo/loss", loss, prog_bar=True, sync_dist=True)
        self.log_dict({f"dpo/{k}": v for k, v in stats.items()}, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.moving is not None:
            self.moving.after_step(self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable(self, checkpoint, self.moving)
        checkpoint["first_losses"] = self.first_losses  # a resumed run reports the same first step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.moving is not None:
            self.moving.load(checkpoint)
        self.first_losses = checkpoint.get("first_losses")


def heldout_preferences(
    actors: FullActors, dataset: PreferenceDataset, ref: tuple[torch.Tensor, torch.Tensor], config: DPOConfig, pad_id,
    device,
) -> dict[str, float]:  # fmt: skip
    """The trained policy's loss and implicit-reward accuracy on held-out pairs (`ref`: their reference
    log-probabilities)."""
    was_training = actors.training
    actors.eval()
    policy = pair_logprobs(actors.policy_logits, dataset, pad_id, config.reference_batch_size, device)
    actors.train(was_training)
    losses, stats = dpo_loss(*policy, *ref, config.beta, config.loss_type)
    return {"val_loss": float(losses.mean()), **{f"val_{k}": float(v) for k, v in stats.items()}}
