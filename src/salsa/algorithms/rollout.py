"""Drawing a rollout through the run's engine (`rollout.engine`), for PPO, GRPO and RLOO alike.

With `hf` the training model samples and its log-probs are the behaviour policy's, exactly. With another engine the
samples come from the engine's arithmetic: the training model rescores them, its log-probs become the behaviour
policy's (so PPO's ratio starts at exactly 1 and the KL to the reference is the trainer's), and the gap between the
two is logged every iteration — the off-policy error the engine introduces. `rollout.tis_cap` adds the truncated
importance weights of the engine's samples towards the training model (`salsa.functional.truncated_is_weights`).
"""

from __future__ import annotations

import dataclasses

import torch

from salsa.functional import masked_mean, truncated_is_weights
from salsa.models.actors import scored_logprobs
from salsa.models.engines import make_engine
from salsa.models.generation import Samples


class EngineRollouts:
    """What an online module mixes in: `self.actors`, `self.tokenizer`, `self.config` (response_length,
    temperature, max_prompt_length, compile_sampler, seed) and `self.rollout_settings` (a `RolloutConfig`)."""

    _engine = None

    def engine(self):
        if self._engine is None:
            c = self.config
            self._engine = make_engine(
                self.rollout_settings, self.actors.generator, c.max_prompt_length + c.response_length,
                compiled=c.compile_sampler, seed=c.seed,
            )  # fmt: skip
        return self._engine

    def close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def on_fit_end(self) -> None:  # Lightning's hook; the pipeline also closes it when a fit fails
        self.close_engine()

    def draw(self, query: torch.Tensor, query_mask: torch.Tensor) -> tuple[Samples, dict, torch.Tensor | None]:
        """The rollout's samples with the training model's log-probs, the engine's statistics (prefixed by the
        caller), and the importance weights of its tokens (None unless `rollout.tis_cap` is set)."""
        c = self.config
        engine = self.engine()
        engine.sync(self.actors.generator)
        s = engine.sample(self.tokenizer, query, query_mask, c.response_length, c.temperature)
        if engine.exact_logprobs:
            return s, {}, None
        mask = s.response_mask
        policy = self.actors.policy
        was_training = policy.training
        policy.eval()  # no dropout in the rescoring (the pipeline's models have none; a user's might)
        trainer_logp = scored_logprobs(
            self.actors.policy_logits, s.sequences, s.attention_mask, s.response, c.temperature,
            self.actors.generator.config.vocab_size,
        ) * mask  # fmt: skip
        policy.train(was_training)
        gap = (s.logprobs - trainer_logp).abs() * mask
        stats = {"engine_logprob_gap": masked_mean(gap, mask), "engine_logprob_gap_max": gap.max()}
        weights = None
        cap = self.rollout_settings.tis_cap
        if cap is not None:
            weights = truncated_is_weights(trainer_logp, s.logprobs, cap) * mask
            stats["is_weight"] = masked_mean(weights, mask)
        return dataclasses.replace(s, logprobs=trainer_logp), stats, weights
