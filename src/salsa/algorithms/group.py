"""What GRPO and RLOO share: k answers per prompt, a baseline from the other answers, no value model.

One Lightning epoch is one iteration:
  1. generate   k answers for each of a batch of prompts (the k of a prompt are consecutive rows, one group)
  2. score      reference log-probabilities and the reward model's score of each answer
  3. advantage  one number per answer from its group (the algorithm's `advantages`)
  4. update     epochs × minibatches of the algorithm's clipped policy loss (`loss`), gradients clipped by norm
The algorithm decides where the KL to the reference goes: GRPO puts it in the loss, RLOO in the reward.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytorch_lightning as pl
import torch

from salsa.algorithms.ppo import _OneBatch, clipped_step, iteration_prompts, minibatches
from salsa.algorithms.reference import MovingReference, keep_trainable
from salsa.algorithms.rollout import EngineRollouts
from salsa.config import GroupConfig, RolloutConfig
from salsa.data.task import judge_answers
from salsa.data.tokens import report_long_prompts
from salsa.functional import kl_k1, kl_k3, logprobs_and_entropy, masked_mean
from salsa.infra.guards import check_finite
from salsa.models.actors import FullActors, scored_logprobs
from salsa.models.generation import Samples, decode, encode_prompts
from salsa.models.sharding import data_parallel_mesh, gathered, without_grad_of


class GroupModule(EngineRollouts, pl.LightningModule):
    """The rollout and update loop; subclasses give `name`, `advantages` and `loss`."""

    name = "group"

    def __init__(
        self, actors: FullActors, tokenizer, prompts: list[str], config: GroupConfig, judge=None,
        moving: MovingReference | None = None, rollout: RolloutConfig | None = None,
    ):  # fmt: skip
        super().__init__()
        config.check(self.name)  # also when built outside the pipeline (benchmarks, tests)
        self.actors, self.tokenizer, self.prompts, self.config, self.judge = actors, tokenizer, prompts, config, judge
        self.rollout_settings = rollout or RolloutConfig()  # rollout.engine: what samples
        self.moving = moving if moving is not None and moving.moving else None  # ref.update: ema | sync
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.last_stats: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # one row per iteration, written to the stage's history.csv
        self.save_hyperparameters(asdict(config))

    # -- what an algorithm defines -------------------------------------------------------------------------------
    def advantages(
        self, scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N,) advantage of each answer from the rollout, and statistics to log."""
        raise NotImplementedError

    def loss(self, logp: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The minibatch's loss from the policy's current log-probabilities `logp` (B, R) and the rollout's tensors."""
        raise NotImplementedError

    # -- 1-3: rollout --------------------------------------------------------------------------------------------
    def generate(self, query: torch.Tensor, query_mask: torch.Tensor) -> tuple[Samples, dict, torch.Tensor | None]:
        """Samples with the training model's log-probs, the engine's statistics, importance weights or None
        (`salsa.algorithms.rollout`)."""
        return self.draw(query, query_mask)

    @without_grad_of(lambda self: self.actors.models())
    def rollout(self, prompts: list[str], iteration: int) -> dict:
        c = self.config
        torch.manual_seed(c.seed * 1_000_003 + iteration)  # sampling is a function of (seed, iteration): resumable
        grouped = [p for p in prompts for _ in range(c.group_size)]
        query, query_mask = encode_prompts(self.tokenizer, grouped, c.max_prompt_length, self.device)
        s, engine_stats, is_weights = self.generate(query, query_mask)
        seq, attn, mask = s.sequences, s.attention_mask, s.response_mask

        vocab = self.actors.generator.config.vocab_size
        with gathered(self.actors.reference):  # ranks score in as many chunks as their answers' length needs
            ref_logp = scored_logprobs(self.actors.reference_logits, seq, attn, s.response, c.temperature, vocab) * mask
        score = self.actors.scores(seq, attn, mask)
        check_finite(
            {"policy logprobs": s.logprobs, "reference logprobs": ref_logp, "rm score": score}, iteration, "iteration"
        )
        if c.missing_eos_penalty is not None:
            score = score - c.missing_eos_penalty * (~s.ended).float()
        advantages, extra = self.advantages(score, s.logprobs * mask, ref_logp, mask)

        n = self.name
        stats = {
            f"{n}/rm_reward": score.mean(),
            f"{n}/kl": (kl_k1(s.logprobs, ref_logp) * mask).sum(1).mean(),
            f"{n}/kl_k3": (kl_k3(s.logprobs, ref_logp) * mask).sum(1).mean(),
            f"{n}/response_length": s.lengths.mean(),
            f"{n}/ended_frac": s.ended.float().mean(),
            # how many groups give no signal: all k answers scored alike
            f"{n}/flat_groups": (score.view(-1, c.group_size).std(1) < 1e-6).float().mean(),
            **{f"{n}/{k}": v for k, v in extra.items()},
            **{f"{n}/{k}": v for k, v in engine_stats.items()},
        }
        if self.judge is not None:
            gold = judge_answers(self.judge, grouped, decode(self.tokenizer, s), s.ended.tolist())
            stats[f"{n}/gold_reward"] = torch.tensor(float(np.mean(gold)))
        batch = {
            "sequences": seq, "attention_mask": attn, "response": s.response, "mask": mask,
            "logprobs": s.logprobs, "ref_logprobs": ref_logp, "advantages": advantages,
            **({"is_weights": is_weights} if is_weights is not None else {}),
        }  # fmt: skip
        return {"batch": batch, "prompt_len": query.size(1), "stats": stats}

    # -- 4: update -----------------------------------------------------------------------------------------------
    def update(self, batch: dict, prompt_len: int, iteration: int) -> dict[str, torch.Tensor]:
        c = self.config
        opt = self.optimizers()
        totals: dict[str, list[torch.Tensor]] = {}
        for mb in minibatches(batch, c.num_minibatches, c.epochs, c.seed, iteration, self.device):
            logits = self.actors.policy_logits(mb["sequences"], mb["attention_mask"], prompt_len) / c.temperature
            logp, token_entropy = logprobs_and_entropy(logits, mb["response"])
            loss, stats = self.loss(logp, mb)
            clipped_step(self, opt, loss, c.max_grad_norm)
            with torch.no_grad():
                stats = {"loss": loss, "entropy": masked_mean(token_entropy, mb["mask"]), **stats}
            for k, v in stats.items():
                totals.setdefault(f"{self.name}/{k}", []).append(v.detach())
        means = {k: torch.stack(v).mean() for k, v in totals.items()}
        check_finite({f"{self.name}/loss": means[f"{self.name}/loss"]}, iteration, "iteration")
        return means

    def training_step(self, batch, batch_idx: int) -> None:
        iteration = self.current_epoch
        c = self.config
        idx = iteration_prompts(
            len(self.prompts), c.batch_size, c.seed, iteration, self.global_rank, self.trainer.world_size
        )
        out = self.rollout([self.prompts[i] for i in idx], iteration)
        stats = {**out["stats"], **self.update(out["batch"], out["prompt_len"], iteration)}
        stats = {k: v.float() for k, v in stats.items()}
        answers = c.batch_size * c.group_size
        self.log_dict(stats, on_step=True, on_epoch=False, sync_dist=True, batch_size=answers)
        self.log("step", float(iteration), on_step=True, on_epoch=False)  # MLflow x-axis = iteration
        self.last_stats = {k: float(self.trainer.callback_metrics.get(k, v)) for k, v in stats.items()}
        self.history.append({"iteration": iteration, **self.last_stats})

    def on_fit_start(self) -> None:
        report_long_prompts(
            self.tokenizer, self.prompts, self.config.max_prompt_length, f"{self.name}.max_prompt_length"
        )

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
        checkpoint["last_stats"] = self.last_stats
        checkpoint["history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.moving is not None:
            self.moving.load(checkpoint)
        self.last_stats = checkpoint.get("last_stats", {})
        self.history = checkpoint.get("history", [])
