"""PPO with a per-token KL penalty to a frozen reference — an SFT model (PPO) or a soup of them (SALSA).

One Lightning epoch is one PPO iteration:
  1. generate   responses for a batch of prompts (KV cache, left padding, temperature); logprobs from the same pass
  2. score      reference logprobs, values, and the reward model's score at each response's last token
  3. KL         per-token KL estimate to the reference (k1 or k3)
  4. shape      reward = score at the last token − kl_coef · KL at every token (− a penalty if it never ended)
  5. GAE        advantages and returns (γ, λ), then whiten the advantages
  6. update     several epochs × minibatches of the clipped policy loss + clipped value loss
  7. adapt      the KL coefficient, if a target KL is set
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytorch_lightning as pl
import torch

from salsa.algorithms.reference import MovingReference, keep_trainable
from salsa.algorithms.rollout import EngineRollouts
from salsa.config import PPOConfig, RolloutConfig
from salsa.data.task import judge_answers
from salsa.data.tokens import report_long_prompts
from salsa.functional import (
    AdaptiveKLController,
    gae,
    kl_estimate,
    kl_k1,
    kl_k3,
    logprobs_and_entropy,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    shaped_rewards,
)
from salsa.infra.guards import check_finite
from salsa.models.actors import FullActors, scored_logprobs
from salsa.models.generation import Samples, decode, encode_prompts
from salsa.models.sharding import data_parallel_mesh, gathered, without_grad_of


def iteration_prompts(n_prompts: int, batch_size: int, seed: int, iteration: int, rank: int, world: int) -> list[int]:
    """Indices of the prompts rank `rank` rolls out at `iteration`: a fresh draw per iteration, disjoint across ranks,
    a pure function of (seed, iteration) so a resumed run sees the same prompts."""
    rng = np.random.default_rng([seed, iteration])
    idx = rng.choice(n_prompts, size=batch_size * world, replace=batch_size * world > n_prompts)
    return idx[rank * batch_size : (rank + 1) * batch_size].tolist()


def minibatches(batch: dict, num_minibatches: int, epochs: int, seed: int, iteration: int, device):
    """`epochs` passes over a rollout's rows in `num_minibatches` minibatches, each pass in a fresh order that is a
    function of (seed, iteration) (resumable). Every order is drawn up front and moved in one copy: no host-device
    transfer inside the update loop."""
    n = batch["sequences"].size(0)
    size = n // num_minibatches
    gen = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    orders = torch.stack([torch.randperm(n, generator=gen) for _ in range(epochs)]).to(device)
    for order in orders:
        for start in range(0, n, size):
            yield {k: v[order[start : start + size]] for k, v in batch.items()}


def clipped_step(module, opt, loss: torch.Tensor, max_grad_norm: float) -> None:
    """One optimizer step of an online algorithm's update loop: backward through Lightning (so strategies and
    precision plugins see it), clip the gradient norm, step, then move the reference when it follows the policy."""
    opt.zero_grad()
    module.manual_backward(loss)
    module.clip_gradients(opt, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    opt.step()
    if module.moving is not None:
        module.moving.after_step(module.global_step)


class _OneBatch(torch.utils.data.Dataset):
    """One item per epoch: the module picks the iteration's prompts itself (see `iteration_prompts`)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        return i


class PPOModule(EngineRollouts, pl.LightningModule):
    def __init__(
        self, actors: FullActors, tokenizer, prompts: list[str], config: PPOConfig, judge=None,
        moving: MovingReference | None = None, rollout: RolloutConfig | None = None,
    ):  # fmt: skip
        super().__init__()
        if config.batch_size % config.num_minibatches:
            raise ValueError(
                f"ppo.batch_size ({config.batch_size}) must be divisible by "
                f"ppo.num_minibatches ({config.num_minibatches})"
            )
        self.actors, self.tokenizer, self.prompts, self.config, self.judge = actors, tokenizer, prompts, config, judge
        self.rollout_settings = rollout or RolloutConfig()  # rollout.engine: what samples
        self.moving = moving if moving is not None and moving.moving else None  # ref.update: ema | sync
        self.kl_ctl = AdaptiveKLController(config.kl_coef, config.target_kl or 1.0, config.kl_horizon)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.last_stats: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # one row per iteration, written to the stage's history.csv
        self.save_hyperparameters(asdict(config))

    # -- 1-5: rollout ----------------------------------------------------------------------------------------------
    def generate(self, query: torch.Tensor, query_mask: torch.Tensor) -> tuple[Samples, dict, torch.Tensor | None]:
        """Samples with the training model's log-probs, the engine's statistics, importance weights or None
        (`salsa.algorithms.rollout`)."""
        return self.draw(query, query_mask)

    # no autograd bookkeeping (inference mode; plain no-grad on sharded weights): the update's minibatch indexing
    # turns these into ordinary tensors
    @without_grad_of(lambda self: self.actors.models())
    def rollout(self, prompts: list[str], iteration: int) -> dict:
        c = self.config
        torch.manual_seed(c.seed * 1_000_003 + iteration)  # sampling is a function of (seed, iteration): resumable
        query, query_mask = encode_prompts(self.tokenizer, prompts, c.max_prompt_length, self.device)
        s, engine_stats, is_weights = self.generate(query, query_mask)
        seq, attn, mask, P = s.sequences, s.attention_mask, s.response_mask, query.size(1)

        # a few rows at a time: full-vocabulary logits of the whole rollout would be the run's largest tensor
        vocab = self.actors.generator.config.vocab_size
        with gathered(self.actors.reference):  # ranks score in as many chunks as their answers' length needs
            ref_logp = scored_logprobs(self.actors.reference_logits, seq, attn, s.response, c.temperature, vocab) * mask
        values = self.actors.values(seq, attn, P) * mask
        score = self.actors.scores(seq, attn, mask)
        check_finite(
            {"policy logprobs": s.logprobs, "reference logprobs": ref_logp, "values": values, "rm score": score},
            iteration,
            "iteration",
        )
        if c.missing_eos_penalty is not None:
            score = score - c.missing_eos_penalty * (~s.ended).float()

        kl = kl_estimate(s.logprobs, ref_logp, c.kl_estimator) * mask
        rewards = shaped_rewards(score, kl, mask, self.kl_ctl.value)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
        advantages = masked_whiten(advantages, mask)

        stats = {
            "ppo/rm_reward": score.mean(),
            "ppo/kl": (kl_k1(s.logprobs, ref_logp) * mask).sum(1).mean(),
            "ppo/kl_k3": (kl_k3(s.logprobs, ref_logp) * mask).sum(1).mean(),
            "ppo/non_score_reward": (-self.kl_ctl.value * kl).sum(1).mean(),
            "ppo/response_length": s.lengths.mean(),
            "ppo/ended_frac": s.ended.float().mean(),
            "ppo/kl_coef": torch.tensor(self.kl_ctl.value),
            **{f"ppo/{k}": v for k, v in engine_stats.items()},
        }
        if self.judge is not None:
            texts = decode(self.tokenizer, s)
            gold = judge_answers(self.judge, prompts, texts, s.ended.tolist())
            stats["ppo/gold_reward"] = torch.tensor(float(np.mean(gold)))
        batch = {
            "sequences": seq, "attention_mask": attn, "response": s.response, "mask": mask,
            "logprobs": s.logprobs, "values": values, "advantages": advantages, "returns": returns,
            **({"is_weights": is_weights} if is_weights is not None else {}),
        }  # fmt: skip
        return {"batch": batch, "prompt_len": P, "stats": stats}

    # -- 6: update -------------------------------------------------------------------------------------------------
    def update(self, batch: dict, prompt_len: int, iteration: int) -> dict[str, torch.Tensor]:
        c = self.config
        opt = self.optimizers()
        totals: dict[str, list[torch.Tensor]] = {}
        for mb in minibatches(batch, c.num_minibatches, c.ppo_epochs, c.seed, iteration, self.device):
            logits = self.actors.policy_logits(mb["sequences"], mb["attention_mask"], prompt_len) / c.temperature
            logp, token_entropy = logprobs_and_entropy(logits, mb["response"])  # one log-softmax for both
            values = self.actors.values(mb["sequences"], mb["attention_mask"], prompt_len)
            pg_loss, pg_stats = ppo_policy_loss(
                logp, mb["logprobs"], mb["advantages"], mb["mask"], c.clip, mb.get("is_weights")
            )
            vf_loss, vf_stats = ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"], c.value_clip)
            loss = pg_loss + c.vf_coef * vf_loss
            clipped_step(self, opt, loss, c.max_grad_norm)
            with torch.no_grad():
                entropy = masked_mean(token_entropy, mb["mask"])
            step = {"ppo/policy_loss": pg_loss, "ppo/value_loss": vf_loss, "ppo/entropy": entropy}
            for k, v in {**step, **pg_stats, **vf_stats}.items():
                totals.setdefault(k if k.startswith("ppo/") else f"ppo/{k}", []).append(v.detach())
        means = {k: torch.stack(v).mean() for k, v in totals.items()}
        check_finite({k: means[k] for k in ("ppo/policy_loss", "ppo/value_loss")}, iteration, "iteration")
        return means

    def training_step(self, batch, batch_idx: int) -> None:
        iteration = self.current_epoch
        c = self.config
        idx = iteration_prompts(
            len(self.prompts), c.batch_size, c.seed, iteration, self.global_rank, self.trainer.world_size
        )
        out = self.rollout([self.prompts[i] for i in idx], iteration)
        stats = {**out["stats"], **self.update(out["batch"], out["prompt_len"], iteration)}
        # 7: adapt the KL coefficient to the observed sequence KL
        if c.target_kl is not None:
            kl = self.all_gather(stats["ppo/kl"]).mean().item()
            self.kl_ctl.update(kl, c.batch_size * self.trainer.world_size)
        stats = {k: v.float() for k, v in stats.items()}
        self.log_dict(stats, on_step=True, on_epoch=False, sync_dist=True, batch_size=c.batch_size)
        self.log("step", float(iteration), on_step=True, on_epoch=False)  # MLflow x-axis = PPO iteration
        # the values reduced across DDP ranks (each rank rolled out its own prompts)
        self.last_stats = {k: float(self.trainer.callback_metrics.get(k, v)) for k, v in stats.items()}
        self.history.append({"iteration": iteration, **self.last_stats})

    def on_fit_start(self) -> None:
        report_long_prompts(self.tokenizer, self.prompts, self.config.max_prompt_length, "ppo.max_prompt_length")

    def configure_model(self) -> None:
        """trainer=fsdp2: shard the models over the data-parallel processes (`salsa.models.sharding`); nothing
        under any other strategy."""
        mesh = data_parallel_mesh(self.device_mesh)
        if mesh is not None:
            self.actors.shard(mesh)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_OneBatch(), batch_size=1)

    def configure_optimizers(self):
        c = self.config
        return torch.optim.AdamW(self.actors.trainable_parameters(), lr=c.lr, weight_decay=c.weight_decay, eps=1e-5)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable(self, checkpoint, self.moving)
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()
        checkpoint["last_stats"] = self.last_stats
        checkpoint["history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.moving is not None:
            self.moving.load(checkpoint)
        self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
        self.last_stats = checkpoint.get("last_stats", {})
        self.history = checkpoint.get("history", [])
