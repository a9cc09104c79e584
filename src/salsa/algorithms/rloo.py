"""RLOO (Ahmadian et al. 2024) against a frozen reference — an SFT model, πother or a soup.

Each answer's reward is its reward-model score minus kl_coef · Σ_t (log π − log π_ref) over its tokens (the KL is in
the reward, as in PPO's shaping, but per sequence); its advantage is that reward minus the mean reward of the other
k − 1 answers to the same prompt. The loss is the clipped surrogate with that advantage at every token (PPO-style
clipping makes the update's later minibatches safe); no value model is trained. The rollout and update loop is
`salsa.algorithms.group.GroupModule`'s.
"""

from __future__ import annotations

import torch

from salsa.algorithms.group import GroupModule
from salsa.config import RLOOConfig
from salsa.functional import aggregate_tokens, clipped_surrogate, kl_k1, leave_one_out_advantages, masked_mean

__all__ = ["RLOOConfig", "RLOOModule"]


class RLOOModule(GroupModule):
    name = "rloo"
    config: RLOOConfig

    def advantages(self, scores, logprobs, ref_logprobs, mask):
        c = self.config
        rewards = scores - c.kl_coef * (kl_k1(logprobs, ref_logprobs) * mask).sum(1)
        adv = leave_one_out_advantages(rewards, c.group_size)
        if c.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        return adv, {"reward": rewards.mean(), "advantage_abs": adv.abs().mean()}

    def loss(self, logp: torch.Tensor, mb: dict[str, torch.Tensor]):
        surrogate, clipped = clipped_surrogate(
            logp, mb["logprobs"], mb["advantages"], self.config.clip, mb.get("is_weights")
        )
        loss = aggregate_tokens(surrogate, mb["mask"], "token")
        with torch.no_grad():
            return loss, {"clip_frac": masked_mean(clipped.float(), mb["mask"])}
